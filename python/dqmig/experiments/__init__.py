"""The experiment harness: run one scenario under several throttling policies (compare) or
across the values of one parameter (sweep), and turn the results into tables, figures and
one self-contained HTML page (report).

scenario.py  TOML scenarios and their validation     runner.py   one migration, measured
metrics.py   slowdown, fairness, medians              compare.py  policies side by side
sweep.py     one parameter across values, repeated    results.py  the saved JSON and its schema
tables.py    text and HTML tables                     figures.py  matplotlib PNGs
html.py      the report page                          report.py   a report directory
cli.py       the compare, sweep and report subcommands
"""
