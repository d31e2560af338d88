"""`cotune simulate`: many virtual devices, each with its own data, through the real coordinator.

The coordinator's services, strategies and round state machine run in this process over SQLite
in memory (`coordinator`); each device's round (its task handler, local training) is a Ray task
or runs in process (`device`, `executors`); `partition` splits one dataset among the devices,
`world` makes tiny models and data when none are given, `job` turns options into a job,
`engine` runs it and `report` writes its figures (ARCHITECTURE.md, "Simulation").

Nothing in `common`, `edge_sdk` or `cloud` imports this package; ray and torch are imported only
inside the functions that use them.
"""
