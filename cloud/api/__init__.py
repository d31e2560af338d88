"""The coordinator's HTTP API, one router per resource; app.py assembles them."""
