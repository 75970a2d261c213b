"""The scripts behind the tables and figures of docs/, each run as `python scripts/NAME.py`."""
