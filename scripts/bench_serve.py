"""Serving many adapters of one base: peftctl's engine against peft, greedy, a burst of requests.

    python scripts/bench_serve.py [--base builtin:smollm2-135m] [--requests 64] [--new-tokens 64]
                                  [--clients 16] [--contenders peftctl,peft-mixed,peft-sequential]
                                  [--targets q_proj,v_proj] [--threads 2]

Adapters: three LoRA (r=8 on q/v) and one IA3, random weights (seeded), on the base; requests go
round-robin over the base and the four adapters, every one generating exactly --new-tokens
(EOS ignored) so the contenders do the same work. --clients clients each send their share of
the requests one after another (client c sends requests c, c + clients, ...), the next when
the last is answered. Contenders, each in a process of its own (for its peak RSS):

  peftctl          the engine behind `peftctl serve` (continuous batching, up to --clients rows)
  peft-mixed       peft's mixed-adapter batch, `generate(..., adapter_names=...)`, in fixed batches
                   of --clients requests (one from each client), each batch after the last; IA3
                   cannot join a LoRA PeftModel, so a batch's IA3 rows are a second generate call
                   on a second PeftModel, which shares the base's weights
  peft-sequential  peft + generate, one request at a time in the order they are sent,
                   `set_adapter` between them

Reported: generated tokens/s over the whole run, p50/p95 time from a request's sending to its
first token and to its last, peak RSS. One line of JSON per contender, then a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MARKER = "BENCH_RESULT "
os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF conversion's bars
ADAPTERS = {"lora-a": {"name": "lora", "r": 8}, "lora-b": {"name": "lora", "r": 8}, "lora-c": {"name": "lora", "r": 8},
            "ia3": {"name": "ia3"}}


def make_adapters(base: str, folder: Path, targets: list[str]) -> dict[str, Path]:
    import torch

    from peftctl import methods
    from peftctl.export.adapter_files import save_adapter
    from peftctl.model.loading import load_model
    from peftctl.recipe.schema import ModelSpec

    spec = ModelSpec(name_or_path=base)
    out = {}
    for seed, (name, options) in enumerate(ADAPTERS.items(), 1):
        options = {**options, "target_modules": targets} if options["name"] == "lora" else options
        adapter = methods.apply(load_model(spec), methods.get(options["name"]).Config(**options))
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for param in adapter.params.values():
                param.add_(0.02 * torch.randn(param.shape, generator=generator))
        out[name] = save_adapter(adapter, folder / name, base)
    return out


def requests(args: argparse.Namespace, tokenizer) -> list[tuple[str, list[int]]]:
    from peftctl.data.tokenize import chat_prompt

    names = [args.base, *ADAPTERS]
    return [(names[i % len(names)], chat_prompt(tokenizer, [{"role": "user", "content": f"Question {i}: which Python "
                                                            f"module provides item number {i * 7}?"}]))
            for i in range(args.requests)]


def run_peftctl(args, folders) -> tuple[list[float], list[float], int, float]:
    import queue
    import threading

    from peftctl.recipe.schema import ModelSpec
    from peftctl.serve.engine import Engine, Finished
    from peftctl.serve.pool import ModelPool
    from peftctl.serve.replies import Sampling

    pool = ModelPool(ModelSpec(name_or_path=args.base), args.base)
    for name, folder in folders.items():
        pool.add(name, folder)
    engine = Engine(pool, max_batch=args.clients, max_queue=args.requests)
    engine.start()
    work = requests(args, pool.tokenizer)
    sampling = Sampling(max_tokens=args.new_tokens, ignore_eos=True)
    first, last, tokens = [0.0] * len(work), [0.0] * len(work), [0] * len(work)

    def client(c: int) -> None:
        for i in range(c, len(work), args.clients):
            box: queue.Queue = queue.Queue()
            job = engine.submit(*work[i], sampling, box.put)
            while not isinstance(event := box.get(), Finished):
                pass
            first[i], last[i], tokens[i] = job.first_token_s, time.monotonic() - job.started, event.completion_tokens

    threads = [threading.Thread(target=client, args=(c,)) for c in range(args.clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - began
    engine.stop(drain=False)
    return first, last, sum(tokens), wall


class FirstToken:
    """A generate() streamer noting when the first new token of a batch comes out (seconds from `start`)."""

    def __init__(self, start: float):
        self.start, self.calls, self.at = start, 0, None

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:  # the first call is the prompt
            self.at = time.perf_counter() - self.start

    def end(self) -> None:
        pass


def run_peft(args, folders, mixed: bool) -> tuple[list[float], list[float], int, float]:
    import torch
    from peft import PeftModel

    from peftctl.model.loading import load_model, load_tokenizer
    from peftctl.recipe.schema import ModelSpec
    from peftctl.serve.pool import shared_weights_copy

    spec = ModelSpec(name_or_path=args.base)
    tokenizer = load_tokenizer(spec)
    base = load_model(spec)
    ia3_base = shared_weights_copy(base)  # IA3 cannot share a PeftModel with LoRA; the weights are shared
    loras = [name for name in ADAPTERS if name.startswith("lora")]
    lora_model = PeftModel.from_pretrained(base, folders[loras[0]], adapter_name=loras[0])
    for name in loras[1:]:
        lora_model.load_adapter(folders[name], adapter_name=name)
    ia3_model = PeftModel.from_pretrained(ia3_base, folders["ia3"], adapter_name="ia3")
    work = requests(args, tokenizer)
    options = {"max_new_tokens": args.new_tokens, "min_new_tokens": args.new_tokens, "do_sample": False,
               "pad_token_id": tokenizer.pad_token_id}
    first, last = [0.0] * len(work), [0.0] * len(work)

    def generate(rows: list[int], sent: dict[int, float]) -> None:
        """One generate call over `rows` (one adapter kind), noting each row's times from its sending."""
        width = max(len(work[i][1]) for i in rows)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(work[i][1])) + work[i][1] for i in rows])
        mask = torch.tensor([[0] * (width - len(work[i][1])) + [1] * len(work[i][1]) for i in rows])
        began = time.perf_counter()
        streamer = FirstToken(began)
        names = [work[i][0] for i in rows]
        if names[0] == "ia3":
            ia3_model.generate(input_ids=input_ids, attention_mask=mask, streamer=streamer, **options)
        elif mixed:
            lora_model.generate(input_ids=input_ids, attention_mask=mask, streamer=streamer, **options,
                                adapter_names=["__base__" if name == args.base else name for name in names])
        elif names[0] == args.base:
            with lora_model.disable_adapter():
                lora_model.generate(input_ids=input_ids, attention_mask=mask, streamer=streamer, **options)
        else:
            lora_model.set_adapter(names[0])
            lora_model.generate(input_ids=input_ids, attention_mask=mask, streamer=streamer, **options)
        done = time.perf_counter()
        for i in rows:
            first[i], last[i] = began + streamer.at - sent[i], done - sent[i]

    began = time.perf_counter()
    with torch.inference_mode():
        if mixed:  # batch k holds each client's k-th request, sent when batch k-1 is done
            for k in range(0, len(work), args.clients):
                rows = list(range(k, min(k + args.clients, len(work))))
                sent = dict.fromkeys(rows, time.perf_counter())
                for kind in ([i for i in rows if work[i][0] != "ia3"], [i for i in rows if work[i][0] == "ia3"]):
                    if kind:
                        generate(kind, sent)
        else:  # one worker; a client sends its next request when its last is answered
            start = time.perf_counter()
            sent = {i: start for i in range(min(args.clients, len(work)))}
            waiting = list(sent)
            while waiting:
                i = waiting.pop(0)
                generate([i], sent)
                if i + args.clients < len(work):
                    sent[i + args.clients] = time.perf_counter()
                    waiting.append(i + args.clients)
    return first, last, len(work) * args.new_tokens, time.perf_counter() - began


def contender(args) -> None:
    """One contender, in this process: its figures as one marked JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    folders = {name: Path(args.adapters) / name for name in ADAPTERS}
    run = {"peftctl": run_peftctl, "peft-mixed": lambda a, f: run_peft(a, f, True),
           "peft-sequential": lambda a, f: run_peft(a, f, False)}[args.only]
    began = time.perf_counter()
    first, last, tokens, wall = run(args, folders)
    def pct(values, q):
        return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]
    result = {"contender": args.only, "tokens": tokens, "tokens_per_s": tokens / wall, "wall_s": wall,
              "ttft_p50_s": pct(first, 50), "ttft_p95_s": pct(first, 95), "last_p50_s": pct(last, 50),
              "last_p95_s": pct(last, 95), "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "total_s": time.perf_counter() - began}
    print(MARKER + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="builtin:smollm2-135m")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--targets", default="q_proj,v_proj", help="The LoRA adapters' layers (GPT-2: c_attn).")
    parser.add_argument("--contenders", default="peftctl,peft-mixed,peft-sequential")
    parser.add_argument("--only", help=argparse.SUPPRESS)
    parser.add_argument("--adapters", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.only:
        return contender(args)
    with tempfile.TemporaryDirectory() as tmp:
        make_adapters(args.base, Path(tmp), args.targets.split(","))
        results = []
        for name in args.contenders.split(","):
            command = [sys.executable, __file__, "--only", name, "--adapters", tmp,
                       *(f"--{key.replace('_', '-')}={value}" for key, value in vars(args).items()
                         if key not in ("only", "adapters", "contenders", "targets"))]
            out = subprocess.run(command, capture_output=True, text=True)
            line = next((line for line in out.stdout.splitlines() if line.startswith(MARKER)), None)
            if line is None:
                sys.exit(f"{name} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(line[len(MARKER):]))
            print(json.dumps(results[-1]), flush=True)
    print("\n| contender | tokens/s | TTFT p50 / p95 (s) | last token p50 / p95 (s) | peak RSS (MiB) |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| {r['contender']} | {r['tokens_per_s']:.1f} | {r['ttft_p50_s']:.2f} / {r['ttft_p95_s']:.2f} | "
              f"{r['last_p50_s']:.2f} / {r['last_p95_s']:.2f} | {r['peak_rss_mib']:.0f} |")


if __name__ == "__main__":
    main()
