"""Every choice of a training run, in one frozen dataclass; the defaults are the paper's recipe
(docs/method.md §6)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from paratransfer.io.checks import finite_number, seed_number, whole_number
from paratransfer.io.errors import UserError
from paratransfer.io.settings import setting
from paratransfer.tasks.examples import prompt_formats_help
from paratransfer.train.inits import INITS

#: Settings that may differ between a run and its resumption (they do not change the result).
_RESUMABLE_CHANGES = {"checkpoint_every", "keep_checkpoints"}


@dataclass(frozen=True)
class TrainSettings:
    """Every choice of a training run; the defaults are the paper's recipe (docs/method.md §6).

    Each field is declared once with `setting`: `paratransfer train`'s flags and the recipe's
    `train` keys come from these fields."""

    init: str = setting("transfer", lambda: "; ".join(f"{i.name}: {i.help}" for i in INITS.values()),
                        recipe=True, choices=INITS)  # a name in train/inits.py, read when parsing
    epochs: int = setting(3, "default {default}", recipe=True)
    lr: float = setting(3e-4, "peak learning rate (default {default})", recipe=True)
    batch_size: int = setting(64, "effective batch over all processes (default {default})",
                              recipe=True)
    micro_batch_size: int = setting(8, "examples per forward pass per process (default {default})",
                                    recipe=True)
    max_length: int = setting(2048, "truncate examples to this many tokens (default {default})")
    max_steps: int | None = setting(None, "stop after N optimizer steps", recipe=True)
    seed: int = setting(1, "default {default}")
    rank: int | None = setting(None, "LoRA r (default: the adapter's, else 16)")
    alpha: float | None = setting(None, "LoRA alpha (default: the adapter's, else 16)")
    dropout: float = setting(0.05, "LoRA dropout (default {default})")
    modules: tuple[str, ...] | None = setting(
        None, "groups (embed,attn,mlp,head) or roles (default: the adapter's, else all)",
        parse=lambda text: tuple(text.split(",")))
    warmup_ratio: float = setting(0.03, "linear warmup over ceil(ratio * steps), then linear "
                                  "decay to 0", flag=False)
    weight_decay: float = setting(0.0, "AdamW weight decay", flag=False)
    max_grad_norm: float = setting(1.0, "gradient clipping as HF Trainer's default; 0 turns it "
                                   "off", flag=False)
    adam_betas: tuple[float, float] = setting((0.9, 0.999), "AdamW betas", flag=False)
    adam_eps: float = setting(1e-8, "AdamW epsilon", flag=False)
    prompt_format: str = setting("tulu", prompt_formats_help)
    checkpoint_every: int = setting(10, "steps between checkpoints (default {default})",
                                    recipe=True)
    eval_every: int | None = setting(None, "steps between held-out losses (default: about ten "
                                     "over the run)", recipe=True)
    distill: str | None = setting(
        None, "also learn the teacher's next-token distributions (logit distillation; same "
        "vocabulary): loss (1 - λ)·CE + λ·τ²·KL(teacher ‖ student); the teacher is needed "
        "during training", recipe=True, recipe_default=False, metavar="TEACHER")
    distill_weight: float = setting(0.5, "λ (default {default})", recipe=True)
    distill_temperature: float = setting(1.0, "τ (default {default})", recipe=True)
    teacher_dtype: str = setting("auto", "dtype of the distillation teacher: auto (the training "
                                 "dtype), float32, bfloat16, float16", recipe=True)
    keep_checkpoints: int = setting(2, "checkpoints kept (the newest)", flag=False)
    init_batches: int = setting(4, "for --init eva/corda: how many of training's first effective "
                                "batches they read (default {default})")

    def __post_init__(self) -> None:
        from paratransfer.arch import parse_roles
        from paratransfer.tasks.examples import PROMPT_FORMATS

        if self.init not in INITS:
            raise UserError(f"--init: {self.init!r} is not known (expected one of: {', '.join(INITS)})")
        for name, flag, least in (("epochs", "--epochs", 1), ("batch_size", "--batch-size", 1),
                                  ("micro_batch_size", "--micro-batch-size", 1),
                                  ("max_length", "--max-length", 2),
                                  ("checkpoint_every", "--checkpoint-every", 1),
                                  ("eval_every", "--eval-every", 1),
                                  ("max_steps", "--max-steps", 1), ("rank", "--rank", 1),
                                  ("keep_checkpoints", "keep_checkpoints", 1),
                                  ("init_batches", "--init-batches", 1)):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, whole_number(flag, getattr(self, name), least))
        object.__setattr__(self, "seed", seed_number("--seed", self.seed))
        for name, flag in (("lr", "--lr"), ("alpha", "--alpha"), ("dropout", "--dropout"),
                           ("warmup_ratio", "warmup_ratio"), ("weight_decay", "weight_decay"),
                           ("max_grad_norm", "max_grad_norm"), ("adam_eps", "adam_eps"),
                           ("distill_weight", "--distill-weight"),
                           ("distill_temperature", "--distill-temperature")):
            if getattr(self, name) is not None:
                object.__setattr__(self, name, finite_number(flag, getattr(self, name)))
        if not 0.0 <= self.distill_weight <= 1.0:
            raise UserError(f"--distill-weight: must be in [0, 1] (got {self.distill_weight})")
        if not self.distill_temperature > 0:
            raise UserError(f"--distill-temperature: must be positive (got "
                            f"{self.distill_temperature})")
        if self.teacher_dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"--teacher-dtype: {self.teacher_dtype!r} is not known (expected auto, "
                            "float32, bfloat16 or float16)")
        if self.micro_batch_size > self.batch_size:
            raise UserError(f"--micro-batch-size ({self.micro_batch_size}) must not exceed "
                            f"--batch-size ({self.batch_size})")
        if not self.lr > 0:
            raise UserError(f"--lr: must be positive (got {self.lr})")
        if self.alpha is not None and not self.alpha > 0:
            raise UserError(f"--alpha: must be positive (got {self.alpha})")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"--dropout: must be in [0, 1) (got {self.dropout})")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise UserError(f"warmup_ratio: must be in [0, 1) (got {self.warmup_ratio})")
        if self.max_grad_norm < 0 or self.weight_decay < 0:
            raise UserError("max_grad_norm and weight_decay must not be negative")
        if self.prompt_format not in PROMPT_FORMATS:
            raise UserError(f"--prompt-format: {self.prompt_format!r} is not known "
                            f"(expected one of: {', '.join(PROMPT_FORMATS)})")
        if self.modules is not None:
            object.__setattr__(self, "modules", parse_roles(self.modules))
        object.__setattr__(self, "adam_betas", tuple(self.adam_betas))

    @classmethod
    def from_recipe(cls, s: dict, seed: int, teacher: str | None = None) -> TrainSettings:
        """From a recipe's (or arm's) settings: every arm gets the recipe's LoRA budget;
        `distill: true` distills from the recipe's `teacher`."""
        if not isinstance(s["distill"], bool):
            raise UserError(f"distill: expected true or false (got {s['distill']!r})")
        if s["distill"] and not teacher:
            raise UserError("distill: true distills from the recipe's teacher, which is missing")
        return cls(init=s["init"], epochs=s["epochs"], lr=s["lr"],
                   batch_size=s["batch_size"], micro_batch_size=s["micro_batch_size"],
                   max_length=s["max_length"], max_steps=s["max_steps"], seed=seed,
                   rank=s["rank"], alpha=s["alpha"], dropout=s["dropout"],
                   modules=s["modules"], prompt_format=s["prompt_format"],
                   checkpoint_every=s["checkpoint_every"], eval_every=s["eval_every"],
                   distill=teacher if s["distill"] else None,
                   distill_weight=s["distill_weight"],
                   distill_temperature=s["distill_temperature"],
                   teacher_dtype=s["teacher_dtype"])

    def as_dict(self) -> dict:
        d = asdict(self)
        d["modules"] = list(self.modules) if self.modules is not None else None
        d["adam_betas"] = list(self.adam_betas)
        return d
