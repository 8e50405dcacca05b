"""The pipeline a recipe runs, in two steps: prepare, then execute.

pipeline.py's `prepare` does every check that needs no weights, once (the output folder, the
tokenizer and the rows, the method on a weightless skeleton, a checkpoint to resume against this
run) and returns a `PreparedRun`; `execute` loads the weights, applies the method (or continues a
saved adapter), trains, exports and writes what the run's report shows. validate.py is what
`peftctl validate` reports beyond the recipe. Read pipeline.py first: it is the map of the rest.

May import: peftctl.report, peftctl.eval, peftctl.plan, peftctl.train, peftctl.export,
peftctl.data, peftctl.model, peftctl.recipe, peftctl.methods, peftctl.arch, peftctl.core.
"""
