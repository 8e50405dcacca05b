"""What people read after a run: the run report and the bake-off report, one self-contained HTML page each.

run_report.py builds a run's page and loss chart from its folder (metrics.jsonl, summary.json, the
sample replies, the recipe); bakeoff_report.py a bake-off's from bakeoff.json; html.py is the
page's markup, plots.py the matplotlib charts (imported only when a chart is drawn). Which report a
folder gets is the `report` command's choice.

May import: peftctl.train (checkpoints' metrics), peftctl.export, peftctl.data, peftctl.model,
peftctl.recipe, peftctl.methods, peftctl.arch, peftctl.core.
"""
