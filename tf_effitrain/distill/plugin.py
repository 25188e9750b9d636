"""The `distillation:` config section as a `TrainerPlugin`."""

import os
import shutil
import time

from tf_effitrain.training.trainer import TrainerPlugin

__all__ = ["DistillationPlugin"]


class DistillationPlugin(TrainerPlugin):
    """Trains the run's model as the student of a finished teacher run.

    The student keeps the teacher's splits and vocabulary (checked before anything
    runs), the teacher is loaded in the run's strategy scope, its logits are computed
    once over the training split when that is valid, and `fit` trains a `Distiller`;
    only the student is saved.

    Args:
        distill_cfg: `DistillationConfig`.
    """

    def __init__(self, distill_cfg):
        self.cfg = distill_cfg
        self.teacher = None
        self.teacher_cfg = None
        self.precompute = None
        self.precompute_seconds = None

    def check_inputs(self, ctx):
        from tf_effitrain.distill.teacher import check_hidden_layers, check_teacher_run
        from tf_effitrain.models.names import named_layers

        self.teacher_cfg = check_teacher_run(self.cfg.teacher, ctx.config, ctx.run_dir)
        cfg, data = self.cfg, ctx.config.data
        student_names = named_layers(ctx.config.model)
        if cfg.hidden_layers and student_names:  # before the run directory is touched
            check_hidden_layers(cfg.hidden_layers, student_names,
                                os.path.join(cfg.teacher, "model.keras"))
        # Precomputed logits are held per example in memory: not for a streamed corpus.
        live_needed = data.token_shuffle > 0 or bool(cfg.hidden_layers) or data.stream
        self.precompute = (not live_needed) if cfg.precompute_teacher is None else (
            cfg.precompute_teacher)

    def before_data(self, ctx):
        from tf_effitrain.distill.teacher import load_teacher
        from tf_effitrain.training.trainer import precision_policy

        # The teacher's token ids: its vocabulary, whatever a cache here holds.
        shutil.copyfile(os.path.join(self.cfg.teacher, "vocab.txt"),
                        os.path.join(ctx.vocab_dir, "vocab.txt"))
        with ctx.strategy.scope(), precision_policy(ctx.keras, ctx.policy):
            self.teacher = load_teacher(self.cfg.teacher, ctx.keras)
        ctx.log(f"teacher: {self.cfg.teacher} ({self.teacher.count_params():,} parameters)")

    def train_features(self, ctx):
        if not self.precompute:
            ctx.log("teacher: runs on every training batch"
                    + (" (token shuffle changes the inputs)" if ctx.config.data.token_shuffle
                       else " (hidden-state terms)" if self.cfg.hidden_layers else ""))
            return None
        from tf_effitrain.distill.distillation import TEACHER_LOGITS
        from tf_effitrain.distill.teacher import teacher_logits

        def features(ds):
            start = time.perf_counter()
            logits = teacher_logits(self.teacher, ds,
                                    batch_size=ctx.config.data.batch_size * 2,
                                    max_length=ctx.config.data.max_length, log=ctx.log)
            self.precompute_seconds = time.perf_counter() - start
            self.precompute_examples = len(logits)
            return {TEACHER_LOGITS: logits}

        return features

    def callbacks(self, ctx):
        # Recorded here, once the run directory is written (the logits were computed
        # while the data was prepared, before anything in it changed).
        if (self.precompute and getattr(self, "precompute_examples", None) and ctx.chief
                and ctx.resumed_from is None):  # a resumed run has its record already
            from tf_effitrain.training.callbacks import METRICS_FILE, append_jsonl

            append_jsonl(os.path.join(ctx.write_dir, METRICS_FILE),
                         {"split": "teacher_logits", "examples": self.precompute_examples,
                          "seconds": self.precompute_seconds})
        return []

    def make_trainable(self, ctx, model):
        from tf_effitrain.distill.distillation import distiller

        cfg = self.cfg
        return distiller(model, self.teacher, alpha=cfg.alpha, temperature=cfg.temperature,
                         accumulation_steps=ctx.config.training.accumulation_steps,
                         hidden_layers=cfg.hidden_layers, hidden_weight=cfg.hidden_weight,
                         scale_by_t2=cfg.scale_by_t2)

    def after_finish(self, ctx):
        from tf_effitrain.distill.teacher import teacher_summary

        teacher = teacher_summary(self.cfg.teacher)
        teacher_params = self.teacher.count_params()
        student_params = ctx.params["total"]
        accuracy = teacher["test_accuracy"]
        student_acc = (ctx.test or {}).get("accuracy")
        lines = [
            "## Distillation", "",
            f"- Teacher: `{self.cfg.teacher}` ({teacher_params:,} parameters, test "
            f"accuracy {accuracy:.4f})" if accuracy is not None else
            f"- Teacher: `{self.cfg.teacher}` ({teacher_params:,} parameters)",
            f"- Student: {student_params:,} parameters "
            f"({student_params / teacher_params:.2f}x the teacher's)"
            + (f", test accuracy {student_acc:.4f}"
               + (f" ({student_acc / accuracy:.1%} of the teacher's)" if accuracy else "")
               if student_acc is not None else ""),
            f"- Loss: {self.cfg.alpha} x labels + {1 - self.cfg.alpha:g} x "
            f"{'T^2 x ' if self.cfg.scale_by_t2 else ''}KL at T = {self.cfg.temperature}"
            + (f" + {self.cfg.hidden_weight} x hidden MSE {self.cfg.hidden_layers}"
               if self.cfg.hidden_layers else ""),
            "- Teacher logits: " + (f"computed once before training "
                                    f"({self.precompute_seconds:.1f} s)" if self.precompute
                                    else "computed on every batch"),
            "- `model.keras` holds the student only.", "",
        ]
        ctx.report_lines += lines
