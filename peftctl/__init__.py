"""peftctl: parameter-efficient fine-tuning of language models from YAML recipes.

The packages, each one job, from the commands down; a package imports only from those below it
(pyproject.toml's import-linter contracts, checked by the test suite; docs/architecture.md):

    cli        the commands: parse, load the recipe, call a component, show the result
    bakeoff    one recipe trained per method or option, compared  } one layer: neither
    serve      chat and the OpenAI-compatible server, many adapters } imports the other
               batched on one base
    run        the pipeline: prepare (every weightless check), then execute
    report     run and bake-off reports              } one layer: none of the three
    eval       held-out scores and sample replies    } imports another
    plan       the weightless skeleton, memory       }
    train      the loop, loss, optimizer, checkpoints, kernels   } one layer
    export     peft's files, merge, combine, GGUF, Ollama        }
    data       rows in, token ids out
    model      bases and tokenizers loaded, quantized
    recipe     the pydantic recipe
    methods    one file per method behind base.py's contract
    arch       layer and architecture facts
    core       errors, atomic files, JSON, Hub ids
"""

import os

os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

__version__ = "0.1.0"
