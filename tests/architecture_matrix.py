"""The generated architecture matrix: every causal-LM family transformers registers, built tiny
from its own config class, under each method family, trained, exported, loaded in peft, merged.

The families come from transformers' auto mapping (`MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`), so a
family transformers adds enters without a change here. Tiny sizes are derived from each config
class's own fields: a field the class has and `SIZES` names is set small, per-layer lists are cut
to the two layers kept (one of each kind, so a hybrid keeps both), and whatever the rules miss is
caught by counting the parameters on the meta device before anything is allocated. A family that
cannot be built small, or cannot run a forward pass that way, is listed with the reason.

Each cell (family × method) ends in one of: holds (trains a step or two, the export loads in peft
with equal logits where peft has the method, merging equals the unmerged model where the method
merges), refused (peftctl's UserError: the message with its key and fix; a mechanical fix is run
and the cell holds with it), or fails (anything else: a bug here or in a library).
"""

from __future__ import annotations

import json
import tempfile
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from peftctl import methods
from peftctl.core.errors import UserError
from peftctl.export.adapter_files import load_adapter, save_adapter
from peftctl.methods import METHODS
from peftctl.train.loss import CausalLMLoss
from tiny_models import batch_logits, real_difference, token_batch, train_steps

VOCAB = 128
# Field name → its tiny value, applied to the fields a config class has. Grouped by meaning.
SIZES: dict[str, int] = {
    **dict.fromkeys(("vocab_size",), VOCAB),
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embedding_size", "attention_hidden_size"), 64),
    **dict.fromkeys(("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers"), 2),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "decoder_attention_heads",
                     "swa_num_attention_heads", "linear_num_value_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "num_kv_heads", "linear_num_key_heads", "index_n_heads"), 2),
    **dict.fromkeys(("head_dim", "swa_head_dim", "v_head_dim", "qk_head_dim", "index_head_dim", "kv_channels",
                     "linear_key_head_dim", "linear_value_head_dim", "mamba_d_head", "attention_head_dim",
                     "linear_head_dim", "mamba_d_state", "state_size", "kv_lora_rank"), 16),
    **dict.fromkeys(("qk_rope_head_dim", "qk_nope_head_dim", "rotary_dim", "time_step_rank", "index_topk",
                     "mamba_dt_rank"), 8),
    **dict.fromkeys(("q_lora_rank",), 32),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "decoder_ffn_dim", "n_inner", "ffn_hidden_size",
                     "shared_expert_intermediate_size", "shared_intermediate_size",
                     "shared_experts_intermediate_size"), 96),
    **dict.fromkeys(("moe_intermediate_size",), 48),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx"), 256),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_topk"), 2),
    **dict.fromkeys(("n_group", "topk_group", "first_k_dense_replace", "decoder_sparse_step"), 1),
    **dict.fromkeys(("mamba_n_heads",), 4),
    **dict.fromkeys(("mamba_chunk_size", "chunk_size"), 16),
    **dict.fromkeys(("sliding_window", "sliding_window_size", "local_attention_window_len"), 32),
}
TOKENS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
MAX_PARAMETERS = 5_000_000  # a tiny build is ~0.1-1M; more means a size the rules did not reach

# The methods of the matrix, by column label: one plain form of each family of method.
METHOD_OPTIONS: dict[str, dict] = {
    "lora": {"name": "lora", "r": 4},
    "dora": {"name": "lora", "r": 4, "use_dora": True},
    "ia3": {"name": "ia3"},  # the paper's layers, feed-forward input scaled (the architecture table's)
    "ia3 no ff": {"name": "ia3", "target_modules": "all-linear", "feedforward_modules": []},
    "bitfit": {"name": "bitfit"},
    "houlsby": {"name": "houlsby", "bottleneck_size": 8},
    "prompt tuning": {"name": "prompt_tuning", "num_virtual_tokens": 4},
}
# Refusals whose fix is one option: (words of the refusal, the options that fix it). The matrix runs
# the fix, so a fix that does not work shows up as a failing cell.
MECHANICAL_FIXES: dict[str, list[tuple[str, dict]]] = {
    "bitfit": [("has no bias terms", {"create_missing_biases": True}),
               ("only linear and LayerNorm biases", {"target_modules": "all-linear", "create_missing_biases": True})],
    "ia3": [("has no default layers", {"target_modules": "all-linear", "feedforward_modules": []})],
}


def causal_lm_families() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


def tiny_config(model_type: str):
    """The family's config class with every size it names set small (see SIZES)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    config_class = CONFIG_MAPPING[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        defaults = config_class().to_dict()
    options = {key: value for key, value in SIZES.items() if isinstance(defaults.get(key), int)
               and not isinstance(defaults.get(key), bool)}
    options.update({key: value for key, value in TOKENS.items() if key in defaults})
    layers = next((defaults[key] for key in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                   if isinstance(defaults.get(key), int)), None)
    for key, value in defaults.items():  # per-layer lists (layer_types): one layer of each kind, two in all
        if isinstance(value, list) and layers and len(value) == layers and key not in options:
            kinds = list(dict.fromkeys(map(str, value)))
            firsts = [value[[str(v) for v in value].index(kind)] for kind in kinds][:2]
            options[key] = (firsts * 2)[:2]
    return config_class(**options)


def build(model_type: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config).float().eval()


def buildable(model_type: str) -> str | None:
    """None if the family builds tiny and runs a forward pass; else the reason it does not."""
    from transformers import AutoModelForCausalLM

    try:
        config = tiny_config(model_type)
        with torch.device("meta"):
            size = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        if size > MAX_PARAMETERS:
            return f"{size:,} parameters at the smallest sizes its config fields allow (sizes under other names)"
        batch = token_batch(VOCAB)
        batch_logits(build(model_type), batch)
        # A training step of the whole tiny model: a family whose training mode fails at these sizes
        # fails without any method, so it is listed here, not as a failure of every method.
        model = build(model_type).train()
        CausalLMLoss(model)(**batch)[0].backward()
    except Exception as err:  # noqa: BLE001 - any failure to build is the reason listed
        return one_line(err)
    return None


@dataclass
class Cell:
    status: str  # "holds", "refused" or "fails"
    detail: str = ""  # the refusal (with its key and fix), the fix run, what peft misreads, or the failure
    fixed: bool = False  # holds once the refusal's fix is applied


def run_cell(model_type: str, label: str) -> Cell:
    options = METHOD_OPTIONS[label]
    fixed, stage = "", ["apply"]
    try:
        try:
            adapter = apply(model_type, options)
        except UserError as refusal:
            fix = next((fix for words, fix in MECHANICAL_FIXES.get(label, []) if words in str(refusal)), None)
            if fix is None:
                return Cell("refused", f"`{refusal.where}`: {one_line(refusal.problem)} (fix: {refusal.fix})")
            # The refusal's fix, run: the cell holds only if the fix works.
            fixed = ", ".join(f"{key}: {json.dumps(value)}" for key, value in fix.items())
            stage.append(f"the fix {fixed}")
            adapter = apply(model_type, {**options, **fix})
        peft_misreads = check_cell(model_type, adapter, stage)
    except Exception as err:  # noqa: BLE001 - a failure of any kind is the cell's finding
        where = traceback.extract_tb(err.__traceback__)[-1]
        return Cell("fails", f"{stage[-1]}: {type(err).__name__}: {one_line(err)} "
                             f"({Path(where.filename).name}, {where.name})")
    if fixed:
        return Cell("holds", f"refused as written; holds with {fixed}", fixed=True)
    return Cell("holds", peft_misreads or "")


def apply(model_type: str, options: dict) -> methods.Adapter:
    config = METHODS[options["name"]].Config(**options)
    torch.manual_seed(0)
    return methods.apply(build(model_type), config)


def check_cell(model_type: str, adapter: methods.Adapter, stage: list[str]) -> str | None:
    """Two steps train (the adapter moves the logits), the export reloads, loads in peft with equal
    logits and merges to the unmerged adapter's logits; `stage` names the check under way. Returns
    what peft reads differently where peft itself rewrites the adapter on load (see peft_rewrites)."""
    stage.append("training")
    batch = token_batch(VOCAB)
    base = batch_logits(build(model_type), batch)
    train_steps(adapter, batch, steps=2)
    ours = batch_logits(adapter.model, batch)
    assert torch.isfinite(ours).all(), "non-finite logits after training"
    assert real_difference(ours, base, batch["attention_mask"]) > 1e-5, "the adapter left the logits unchanged"
    with tempfile.TemporaryDirectory() as folder:
        stage.append("export")
        save_adapter(adapter, Path(folder), base_model=model_type)
        stage.append("reloaded in peftctl")
        reloaded = batch_logits(load_adapter(build(model_type), Path(folder)).model, batch)
        torch.testing.assert_close(reloaded, ours, atol=1e-5, rtol=0)
        rewritten = peft_rewrites(model_type, Path(folder)) if adapter.method.in_peft else None
        if adapter.method.in_peft and not rewritten:
            stage.append("loaded in peft")
            import peft

            theirs = batch_logits(peft.PeftModel.from_pretrained(build(model_type), folder).eval(), batch)
            torch.testing.assert_close(theirs[:, theirs.shape[1] - ours.shape[1]:], ours, atol=1e-4, rtol=0)
        if adapter.method.merge_refusal is None:
            stage.append("merge")
            loaded = load_adapter(build(model_type), Path(folder))
            merged = loaded.method.merge(loaded).eval()
            # rtol too: folding the update into W reorders fp32 sums, and some families' logits are large (CPM-Ant's).
            torch.testing.assert_close(batch_logits(merged, batch), ours, atol=1e-4, rtol=1e-4)
    return rewritten


def peft_rewrites(model_type: str, folder: Path) -> str | None:
    """What peft changes in the exported config before loading it, if anything. peft converts the
    LoRA targets of the MoE families whose layout changed in transformers 5 (`gate_proj`, `up_proj`,
    `down_proj` become expert target_parameters), dense layers' targets included; it then cannot load
    the adapter as trained. Asked of peft's own conversion, so a peft that stops doing it shows here."""
    import peft

    try:
        from peft.utils.transformers_weight_conversion import convert_peft_config_for_transformers
    except ImportError:
        return None
    config = peft.PeftConfig.from_pretrained(folder)
    if not hasattr(config, "target_modules"):  # prompt methods: nothing to convert
        return None
    before = (set(config.target_modules or []), set(getattr(config, "target_parameters", None) or []))
    convert_peft_config_for_transformers(config, build(model_type), None)
    after = (set(config.target_modules or []), set(getattr(config, "target_parameters", None) or []))
    if after == before:
        return None
    moved = sorted(before[0] - after[0])
    return (f"peft {peft.__version__} rewrites target_modules {moved} into target_parameters "
            f"{sorted(after[1] - before[1])} on load (its transformers 4 → 5 MoE conversion, applied to the "
            "dense layers too), so it loads this adapter differently; peftctl reloads and merges it exactly")


def one_line(err: BaseException | str) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 200 else text[:197] + "..."


def matrix(families: list[str], labels: list[str] | None = None) -> tuple[dict[str, dict[str, Cell]], dict[str, str]]:
    """Every cell of `families` × `labels`, and the families that cannot be built small (with why)."""
    import transformers

    transformers.logging.set_verbosity_error()  # tiny configs trip every size warning
    cells: dict[str, dict[str, Cell]] = {}
    unbuilt: dict[str, str] = {}
    for family in families:
        reason = buildable(family)
        if reason is not None:
            unbuilt[family] = reason
            continue
        cells[family] = {label: run_cell(family, label) for label in labels or METHOD_OPTIONS}
    return cells, unbuilt


def markdown(cells: dict[str, dict[str, Cell]], unbuilt: dict[str, str], versions: str) -> str:
    """The docs page: the table (family × method), then every refusal and failure in words."""
    labels = list(next(iter(cells.values()))) if cells else list(METHOD_OPTIONS)
    mark = {"holds": "holds", "refused": "refused", "fails": "**fails**"}
    lines = [
        "# Architecture matrix", "",
        "Generated by `pytest -m slow tests/test_architecture_matrix.py` (`tests/architecture_matrix.py`); do not",
        "edit by hand. Every causal-LM family in transformers' auto mapping is built tiny from its own config",
        "class (2 layers, hidden 64, vocabulary 128, 4 experts), and each method trains two steps on it; *holds*",
        "means the export loads in `peft` with equal logits (where peft has the method) and the merge equals",
        "the unmerged model (where the method merges). A refusal comes before training, with the recipe key",
        f"and the fix, listed below the table. {versions}", "",
        f"{len(cells)} families built, {len(unbuilt)} could not be built small.", "",
        "| family | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for family, row in cells.items():
        lines.append(f"| `{family}` | " + " | ".join(
            (("holds with the fix" if cell.fixed else "holds; peft misreads") if cell.detail else "holds")
            if cell.status == "holds" else mark[cell.status]
            for cell in row.values()) + " |")
    lines += ["", "## Refusals, fixes and failures", ""]
    for family, row in cells.items():
        for label, cell in row.items():
            if cell.detail:
                status = cell.status if cell.status != "holds" else "refused, its fix run" if cell.fixed else \
                    "holds in peftctl, peft misreads"
                lines.append(f"- `{family}` × {label}, {status}: {escape(cell.detail)}")
    lines += ["", "## Families that cannot be built small", ""]
    lines += [f"- `{family}`: {escape(reason)}" for family, reason in unbuilt.items()]
    return "\n".join(lines) + "\n"


def escape(text: str) -> str:
    """Markdown-safe text: angle brackets would read as HTML tags, pipes as table cells."""
    return text.replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")
