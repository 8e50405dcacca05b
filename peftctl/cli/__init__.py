"""The command line: parse arguments, load the recipe, call a component, show the result.

commands.py is the Typer app (the `peftctl` entry point), one function per command; parsing.py reads
what typer's parser alone cannot and holds the shared option types; boundary.py turns every
UserError into one message and exit 2 and quiets the libraries; console.py is what people see (the
progress bar, rich tables) and `--json` what programs read; eval_args.py resolves `peftctl eval`'s
arguments (recipes, adapters, data) into what eval/ scores. A new command is a function in
commands.py that calls a component; no component imports this package.

May import: every other peftctl package.
"""
