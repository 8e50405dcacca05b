"""Chat and serving: answer with the base and any number of adapters on it, one base in memory.

pool.py loads the base once and each adapter onto a view sharing its weights; routing.py lets
the rows of one forward pass each use their own adapter; replies.py chooses tokens and streams
text; engine.py is the continuous-batching loop; chat.py is `peftctl chat`'s conversation;
openai_api.py and http_app.py are `peftctl serve`'s OpenAI-compatible HTTP API (FastAPI), and
server.py runs it under uvicorn with its safety checks. Nothing here prints or parses arguments.

May import: run, report, eval, plan, train, export, data, model, recipe, methods, arch, core
(not cli, not bakeoff).
"""
