"""`kind: pipeline`: stages of any kind chained by their artifacts, run in dependency order and skipped
when unchanged (driver.py), with the record of what came from what (lineage.py)."""
