"""What a task (causal LM, sequence classification, sequence-to-sequence) decides about a model.

A task picks the transformers class a base loads as, peft's `task_type`, and which modules are a
head that trains whole (peft's `modules_to_save`): a classifier's head is new, so no adapter can
stand in for it. The data layout, the loss and the metrics of each task live with the data, the
loop and eval; they key on the same names.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal, get_args

from torch import nn

Task = Literal["causal_lm", "sequence_classification", "seq2seq"]
TASKS: tuple[str, ...] = get_args(Task)

# peft's task_type for each task, as adapter_config.json records it.
PEFT_TASK_TYPES = {"causal_lm": "CAUSAL_LM", "sequence_classification": "SEQ_CLS", "seq2seq": "SEQ_2_SEQ_LM"}
# transformers' auto class a base loads as for each task.
AUTO_CLASSES = {"causal_lm": "AutoModelForCausalLM", "sequence_classification": "AutoModelForSequenceClassification",
                "seq2seq": "AutoModelForSeq2SeqLM"}


@dataclass(frozen=True)
class TaskHead:
    """The task a base is loaded for and, for a classifier, its label names (the head's outputs in order)."""

    task: str = "causal_lm"
    labels: tuple[str, ...] = ()

    def from_pretrained_args(self) -> dict:
        """What the auto class needs beyond the weights: a classifier's size and label names."""
        if self.task != "sequence_classification":
            return {}
        return {"num_labels": len(self.labels), "id2label": dict(enumerate(self.labels)),
                "label2id": {name: i for i, name in enumerate(self.labels)},
                "problem_type": "single_label_classification"}


def task_of_peft_type(task_type: str | None) -> str:
    """The task an adapter_config.json's task_type names (peft leaves it out for some methods: causal LM)."""
    for task, peft_name in PEFT_TASK_TYPES.items():
        if peft_name == task_type:
            return task
    return "causal_lm"


def model_task(model: nn.Module) -> str:
    """The task a loaded model was built for, read off its class (what `head_modules` needs when
    only the model is at hand)."""
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "sequence_classification"
    return "seq2seq" if getattr(getattr(model, "config", None), "is_encoder_decoder", False) else "causal_lm"


def head_modules(model: nn.Module, task: str) -> list[str]:
    """The modules a task's head consists of, which train whole: for a classifier, every child of
    the model beside its transformer body (BERT's `classifier`, DistilBERT's `pre_classifier` and
    `classifier`, DeBERTa's `pooler` and `classifier`, a decoder's `score`) and the body's pooler
    where it has one (BERT's: it feeds the classifier, and checkpoints saved from a masked-LM or
    sentence-embedding model lack it); none for the other tasks, whose output layer is pretrained."""
    if task != "sequence_classification":
        return []
    body_name = getattr(model, "base_model_prefix", None)
    head = [name for name, child in model.named_children() if name != body_name and _has_params(child)]
    pooler = getattr(getattr(model, body_name, None), "pooler", None) if body_name else None
    if isinstance(pooler, nn.Module) and _has_params(pooler):
        head.append(f"{body_name}.pooler")
    return head


def inside(name: str, modules: Iterable[str]) -> bool:
    """Whether the module or parameter `name` is one of `modules` or lies inside one."""
    return any(name == module or name.startswith(module + ".") for module in modules)


def in_own_head(model: nn.Module) -> Callable[[str], bool]:
    """Whether a name of `model` lies in the head its own class gives it (a classifier's), which
    trains whole: no method's layer selection may take it too."""
    head = head_modules(model, model_task(model))
    return lambda name: inside(name, head)


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())
