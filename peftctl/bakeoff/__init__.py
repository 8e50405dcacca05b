"""`peftctl bakeoff`: one recipe trained with each of several methods (and option values), then compared.

planning.py plans the runs and does every weightless check for all of them before the first one
trains; runner.py trains each in a process of its own and scores it; state.py keeps bakeoff.json,
so a bake-off stopped anywhere continues; table.py makes the comparison's rows and bakeoff.md. The
engine returns results and reports progress through a callback: showing them is the command's job.

May import: peftctl.run, peftctl.report, peftctl.eval, peftctl.plan, peftctl.train, peftctl.export,
peftctl.data, peftctl.model, peftctl.recipe, peftctl.methods, peftctl.arch, peftctl.core.
"""
