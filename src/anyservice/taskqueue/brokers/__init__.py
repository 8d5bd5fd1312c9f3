"""The storages of task runs, one module each, behind the broker protocol."""
