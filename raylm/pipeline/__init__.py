"""`kind: pipeline`: stages of any kind chained by their artifacts, run in dependency order and skipped
when unchanged (driver.py); the record of what came from what is raylm/report/lineage.py."""
