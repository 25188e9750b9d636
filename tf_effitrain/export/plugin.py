"""The `export:` config section as a `TrainerPlugin`: export right after training."""

from tf_effitrain.training.trainer import TrainerPlugin

__all__ = ["ExportPlugin"]


class ExportPlugin(TrainerPlugin):
    """Exports and verifies the run's saved model once `train` has written it.

    Args:
        export_cfg: `ExportConfig`. Formats, quantizations and verification settings.
    """

    def __init__(self, export_cfg):
        self.export_cfg = export_cfg

    def after_finish(self, ctx):
        from tf_effitrain.export.run_export import EXPORT_REPORT, export_run

        if not ctx.chief:  # only the chief has the run directory
            return
        cfg = self.export_cfg
        formats = [f for f in cfg.formats if f != "tflite" or cfg.quantize]
        report = export_run(ctx.write_dir, formats=formats, quantizations=cfg.quantize,
                            sequence_length=cfg.sequence_length,
                            num_samples=cfg.representative_samples,
                            allow_flex=cfg.allow_flex, threads=cfg.threads,
                            delegates=cfg.delegates,
                            debug_quantization=cfg.debug_quantization, log=ctx.log)
        ctx.report_lines += [
            "## Export", "",
            f"{len(report['files'])} file(s) in `export/`; verification in "
            f"[{EXPORT_REPORT}.md]({EXPORT_REPORT}.md)."]
