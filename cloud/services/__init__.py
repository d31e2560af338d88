"""The coordinator's services, one job each; routes (cloud/api/) and the round driver call them."""
