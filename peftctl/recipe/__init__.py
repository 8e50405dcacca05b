"""The recipe: one typed, validated, documented description of a run.

The pydantic models (schema.py) are the single source of truth for every key, default, check,
the JSON schema (`peftctl schema`) and the generated reference (reference.py →
docs/reference/recipe.md). Reading YAML strictly (yaml_file.py), turning validation errors into
messages that name the key and line (validation_errors.py), and resolving and checking a recipe's
paths (paths.py) sit beside it. The components take these models as plain typed data; nothing
here knows the command line.

May import: peftctl.methods (each method's options are part of the schema), peftctl.arch,
peftctl.core.
"""
