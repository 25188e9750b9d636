"""`compression.pruning` and `compression.qat` as `TrainerPlugin`s: the tfmot stages of
`tf-effitrain compress` (tf_keras engine)."""

import os

import numpy as np

from tf_effitrain.training.trainer import TrainerPlugin

__all__ = ["PruningPlugin", "QATPlugin", "INT8_FILE", "sparsity_lines", "aligned_schedule"]

INT8_FILE = "model_int8.tflite"


def sparsity_lines(table, title="Sparsity per kernel"):
    """report.md lines: one row per kernel, and the overall sparsity of those kernels."""
    if not table:
        return []
    zeros = sum(r["zeros"] for r in table)
    size = sum(r["size"] for r in table)
    lines = [f"### {title}", "", "| layer | weight | shape | zeros | sparsity |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['weight']} | {'x'.join(map(str, r['shape']))} | "
              f"{r['zeros']:,} / {r['size']:,} | {r['sparsity']:.1%} |" for r in table]
    lines += ["", f"Pruned kernels together: {zeros:,} of {size:,} weights are zero "
              f"({zeros / max(size, 1):.1%}).", ""]
    return lines


def aligned_schedule(begin, end, end_fraction, frequency, total, constant=False):
    """`(end_step, frequency)` with which a schedule reaches its target inside a run of
    `total` updates.

    tfmot updates masks at updates `begin + i * frequency` (update counts start at 1),
    and the polynomial schedule reaches its target only at a mask update: `end` is
    moved down onto one, and `frequency` lowered when the run is too short for it
    (at least 2 mask updates before the end). `end` None: `end_fraction` of `total`.
    For a constant schedule `end` is None (prune to the end).
    """
    if constant:
        room = max(1, total - begin)
        return None, max(1, min(frequency, room // 2 or 1))
    if end is None:
        end = max(begin + 1, int(round(end_fraction * total)))
    span = end - begin
    frequency = max(1, min(frequency, span // 2 or 1))
    return begin + (span // frequency) * frequency, frequency


def _zero_shares(model):
    """`{layer name: largest share of zeros among its kernels}` for prunable kinds."""
    from tf_effitrain.compress.pruning import sparsity_table

    shares = {}
    for row in sparsity_table(model):
        shares[row["layer"]] = max(shares.get(row["layer"], 0.0), row["sparsity"])
    return shares


class PruningPlugin(TrainerPlugin):
    """Wraps the model for tfmot pruning, strips it after training, reports sparsity.

    Args:
        pruning: `PruningConfig`. What to prune and on which schedule.
        summary: dict or None. The compression summary to add the sparsity table to.
    """

    def __init__(self, pruning, summary=None):
        self.pruning = pruning
        self.summary = summary
        self.table = None
        self.pruned_names = []

    def steps(self, ctx):
        """`(end_step, frequency)` for this run: the polynomial schedule reaches the
        target at a mask update, within the run's updates."""
        p = self.pruning
        steps = ctx.config.training.steps_per_epoch or ctx.data.train_batches
        return aligned_schedule(p.begin_step, p.end_step, p.end_fraction, p.frequency,
                                steps * ctx.config.training.epochs,
                                constant=p.schedule == "constant" or p.m_by_n is not None)

    def transform_model(self, ctx, model):
        from tf_effitrain.compress.pruning import prune, pruning_wrappers

        p = self.pruning
        end, frequency = self.steps(ctx)
        total = (ctx.config.training.steps_per_epoch or ctx.data.train_batches) * \
            ctx.config.training.epochs
        if p.begin_step + frequency > total or (end is not None and end > total):
            from tf_effitrain.config import ConfigError

            raise ConfigError(
                f"The pruning schedule does not fit the fine-tuning's {total} updates "
                f"(`compression.fine_tune_epochs` x updates per epoch): the target would "
                "not be reached. Lower `compression.pruning.begin_step` / `end_step` or "
                f"train longer. Received: begin_step={p.begin_step}, end_step={p.end_step}")
        pruned, _ = prune(model, p.target_sparsity, p.schedule, p.begin_step, end,
                          frequency, p.initial_sparsity, p.m_by_n, p.layers,
                          p.embedding, p.head)
        self.pruned_names = [w.layer.name for w in pruning_wrappers(pruned)]
        what = (f"{p.m_by_n[0]}:{p.m_by_n[1]} sparsity from the first update"
                if p.m_by_n else
                f"{p.target_sparsity:.0%} sparsity, {p.schedule} schedule, masks every "
                f"{frequency} updates" + (f" until update {end}" if end else ""))
        ctx.log(f"pruning: {len(self.pruned_names)} layers wrapped (tfmot), {what}")
        return pruned

    def finish_model(self, ctx, model):
        from tf_effitrain.compress.pruning import sparsity_table, strip

        stripped = strip(model)
        self.table = [r for r in sparsity_table(stripped) if r["layer"] in self.pruned_names]
        if self.summary is not None:
            self.summary["sparsity"] = self.table
        ctx.report_lines += ["## Pruning", ""] + sparsity_lines(self.table)
        return stripped


class QATPlugin(TrainerPlugin):
    """Quantization-aware training; saves the float model with the QAT-trained weights
    as `model.keras` and converts the QAT model itself to a full-integer int8 TFLite
    file (its learned ranges used), verified on the test split.

    The run's test accuracy (report, metrics, `compression.json`) is that of the saved
    float model; the fake-quantized model's and the int8 file's are reported beside it.

    Args:
        pruning: `PruningConfig` or None. The pruning the model went through: QAT then
            preserves the zeros (tfmot's pruning-preserving scheme for the Dense
            kernels; the pruned layers it does not wrap, such as the embedding table
            and low-rank factors, are frozen).
        summary: dict or None. The compression summary (written to `compression.json`
            before this plugin's `after_finish`) to add the int8 file's figures to.
    """

    def __init__(self, pruning=None, summary=None):
        self.pruning = pruning
        self.summary = summary
        self.qat_model = None
        self.qat_accuracy = None
        self.frozen = []
        self.preserving = False
        self.int8 = None

    def transform_model(self, ctx, model):
        from tf_effitrain.compress.qat import QAT_LAYER_KINDS, _mostly_sparse, quantize_aware

        p = self.pruning
        # After a pruning stage: always keep the zeros; on a run pruned earlier: when its
        # kernels hold them (`quantize_aware` looks).
        self.qat_model = quantize_aware(model, preserve_sparsity=True if p else None)
        preserving = p is not None or _mostly_sparse(model)
        names = {layer.name for layer in self.qat_model.layers}
        for name in self._pruned_layers(model) if preserving else []:
            layer = self.qat_model.get_layer(name) if name in names else None
            if layer is not None and type(layer).__name__ not in QAT_LAYER_KINDS:
                # Not QAT-wrapped (the embedding: int32 ids; low-rank factors), so the
                # prune-preserving scheme cannot keep its zeros: frozen.
                layer.trainable = False
                self.frozen.append(name)
        self.preserving = preserving
        wrapped = sum(hasattr(layer, "quantize_config") for layer in self.qat_model.layers)
        ctx.log(f"qat: {wrapped} Dense layers fake-quantized to int8 (tfmot"
                + (", pruning-preserving" if preserving else "")
                + "; embeddings, norms and softmax are quantized at conversion)"
                + (f"; frozen to keep their zeros: {', '.join(self.frozen)}" if self.frozen
                   else ""))
        return self.qat_model

    def _pruned_layers(self, model):
        """Names of `model`'s pruned layers: those the pruning stage chose, or (on a run
        pruned earlier) those holding a share of exact zeros."""
        from tf_effitrain.compress.pruning import selected_layers
        from tf_effitrain.compress.qat import SPARSE_SHARE

        p = self.pruning
        if p is not None:
            return selected_layers(model, p.layers, p.embedding, p.head)[0]
        return [name for name, zeros in _zero_shares(model).items() if zeros >= SPARSE_SHARE]

    def finish_model(self, ctx, model):
        from tf_effitrain.models import build_transformer_classifier
        from tf_effitrain.training.trainer import _compile_for_classification, _shard_by_data

        if ctx.data.test is not None:
            self.qat_accuracy = float(ctx.trainable.evaluate(
                _shard_by_data(ctx.data.test), return_dict=True, verbose=0)["accuracy"])
        # `model.keras` is the plain float model with the QAT-trained weights (it loads
        # without tfmot); the int8 file is converted from the QAT model below.
        plain = build_transformer_classifier(
            ctx.config.model, len(ctx.data.vocab), len(ctx.data.class_names),
            ctx.config.data.max_length, keras=ctx.keras)

        def short(var):
            return var.name.split("/")[-1].split(":")[0]

        names = {layer.name for layer in plain.layers}
        for layer in model.layers:
            # A QuantizeWrapperV2 named `quant_<name>` holds the layer's kernel and bias
            # among its quantizer ranges; tfmot's own layers (QuantizeLayer) have none.
            name = layer.layer.name if hasattr(layer, "quantize_config") else layer.name
            if not layer.weights or name not in names:
                continue
            target = plain.get_layer(name)
            found = {short(v): v for v in layer.weights}
            target.set_weights([found[short(v)].numpy() for v in target.weights])
        # The test evaluation that follows is of the model that is saved.
        _compile_for_classification(plain, ctx.keras)
        ctx.trainable = plain
        return plain

    def _write_summary(self, ctx):
        import json

        from tf_effitrain.compress.run import COMPRESSION_FILE

        with open(os.path.join(ctx.write_dir, COMPRESSION_FILE), "w", encoding="utf-8") as f:
            json.dump(self.summary, f, indent=2)

    def after_finish(self, ctx):
        if not ctx.chief:
            return
        from tf_effitrain.export.run_export import _rows_and_labels
        from tf_effitrain.export.tflite import export_tflite, gzipped_size
        from tf_effitrain.export.verify import run_tflite

        length = ctx.config.data.max_length
        path = os.path.join(ctx.write_dir, INT8_FILE)
        audit = export_tflite(self.qat_model, path, "int8", representative_data=ctx.data.train,
                              sequence_length=length)
        gz = gzipped_size(path)
        s = {"file": INT8_FILE, "bytes": os.path.getsize(path), "gzip_bytes": gz,
             "float_ops": list(audit.float_ops), "qat_accuracy": self.qat_accuracy,
             "float_accuracy": (ctx.test or {}).get("accuracy")}
        if ctx.data.test is not None:
            rows, labels = _rows_and_labels(ctx.data.test, length)
            logits, _ = run_tflite(path, rows, "none")
            s["tflite_accuracy"] = float(np.mean(np.argmax(logits, -1) == labels))
        self.int8 = s
        if self.summary is not None:
            self.summary["int8"] = s
            self._write_summary(ctx)
        ctx.log(f"qat: {INT8_FILE} {s['bytes'] / 1024:.0f} KB ({gz / 1024:.0f} KB gzipped)"
                + (f", test accuracy {s['tflite_accuracy']:.4f}" if "tflite_accuracy" in s
                   else ""))
        acc = s.get("tflite_accuracy")
        ctx.report_lines += [
            "## Quantization-aware training", "",
            f"`{INT8_FILE}`: full-integer int8 from the QAT model, {s['bytes']:,} bytes "
            f"({gz:,} gzipped); float ops left: {s['float_ops'] or 'none'}.",
            *([f"Test accuracy: int8 TFLite file (reference kernels) {acc:.4f}; the QAT "
               f"(fake-quantized) Keras model {s['qat_accuracy']:.4f}; the saved float "
               f"`model.keras` {s['float_accuracy']:.4f}."] if acc is not None else []),
            ""]
        if self.preserving:
            from tf_effitrain.compress.pruning import sparsity_table

            chosen = self._pruned_layers(ctx.model)
            table = [r for r in sparsity_table(ctx.model) if r["layer"] in chosen]
            ctx.report_lines += sparsity_lines(table, "Sparsity kept through QAT")
            if self.summary is not None:
                self.summary["sparsity"] = table
                self._write_summary(ctx)
