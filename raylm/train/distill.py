"""Driver of `kind: distill`: knowledge distillation on Ray Train, the pretraining pipeline with a
frozen teacher beside each worker's student.

    raylm run jobs/distill.yaml
    raylm run jobs/distill.yaml --set distill.alpha=0 --set output=runs/student-alone   # the baseline

The student trains on loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha)
* CE, summed over the global batch's tokens like the pretraining loss (Hinton et al. 2015; the T^2
keeps the soft term's gradients on the scale of the hard one's). Evaluation reports the student's plain
held-out loss, so a distilled run and the student alone (`distill.alpha: 0`) compare directly. Every
worker holds a whole copy of the teacher (inference only, no gradients or optimizer state), whatever
the student's strategy.
"""

from __future__ import annotations

import json
from pathlib import Path

from raylm.spec.jobs import DistillJob
from raylm.train.pretrain import Pretrain, run_pretrain


class Distill(Pretrain):
    """kind: distill (a raylm.kinds.TrainingKind): pretraining's hooks plus the distillation loss."""

    def preflight(self, job: DistillJob) -> list[tuple[str, str]]:
        from raylm.runtime.preflight import check_model_folder

        problems = check_model_folder(job.teacher.path, "teacher.path", "config.json") + super().preflight(
            job
        )
        return problems or tokenizer_problems(job)

    def run(self, job: DistillJob) -> dict:
        summary = run_pretrain(self, job)
        summary["teacher"] = job.teacher.path
        summary["distill"] = job.distill.model_dump()
        return summary

    def worker_objective(self, job: DistillJob, tokenizer, device, engine, config: dict):
        from raylm.planning.models import build_model
        from raylm.spec.sections import ModelSpec

        teacher = build_model(
            ModelSpec(
                path=job.teacher.path, dtype=job.model.dtype, trust_remote_code=job.teacher.trust_remote_code
            ),
            vocab_size=0,
        ).to(device)
        teacher.eval().requires_grad_(False)
        return distillation_loss(teacher, job.distill.temperature, job.distill.alpha)


def distillation_loss(teacher, temperature: float, alpha: float):
    """objective(student, batch, items): the distillation loss of a batch, summed over its labelled
    tokens and divided by `items` (their count over the global batch), else their mean."""
    import torch
    import torch.nn.functional as F

    def objective(student, batch: dict, items=None):
        ids = batch["input_ids"]
        labels = batch.get("labels", ids)[:, 1:]
        mask = batch.get("attention_mask")
        logits = student(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        with torch.no_grad():
            soft = teacher(input_ids=ids, attention_mask=mask).logits[:, :-1].float() / temperature
        shared = min(logits.shape[-1], soft.shape[-1])  # a vocabulary padded past the tokenizer's
        logits, soft = logits[..., :shared], soft[..., :shared]
        valid = labels != -100
        hard = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
        teacher_logp = F.log_softmax(soft, dim=-1)
        student_logp = F.log_softmax(logits / temperature, dim=-1)
        kl = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(-1)  # per token
        total = alpha * temperature**2 * (kl * valid).sum() + (1 - alpha) * hard
        return total / (items if items is not None else valid.sum().clamp(min=1))

    return objective


def tokenizer_problems(job: DistillJob) -> list[tuple[str, str]]:
    """The student reads the teacher's token ids: a student folder's own tokenizer must be the
    teacher's, and its vocabulary at least as large."""
    from raylm.data.tokenizer import load_tokenizer

    teacher = load_tokenizer(job.teacher.path, trust_remote_code=job.teacher.trust_remote_code)
    vocab = teacher.get_vocab()
    problems = []
    for where, path in (("tokenizer.path", job.tokenizer.path), ("model.path", job.model.path)):
        folder = Path(path) if path else None
        if (
            folder is None
            or folder == Path(job.teacher.path)
            or not (folder / "tokenizer_config.json").exists()
        ):
            continue
        if load_tokenizer(str(folder)).get_vocab() != vocab:
            problems.append(
                (
                    where,
                    "its tokenizer differs from the teacher's: distillation compares next-token "
                    "distributions token id by token id, so the student must use the teacher's tokenizer",
                )
            )
    if job.model.path is not None:
        size = json.loads((Path(job.model.path) / "config.json").read_text()).get("vocab_size", 0)
        if size < len(teacher):
            problems.append(
                (
                    "model.path",
                    f"the student's vocabulary ({size}) is smaller than the teacher's ({len(teacher)})",
                )
            )
    return problems
