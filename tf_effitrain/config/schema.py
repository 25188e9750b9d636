"""Typed experiment configuration: one dataclass per section of the YAML file.

Field metadata carries what validation needs (`choices`, `min`, `max`); `loader.py`
checks types and those bounds, and each section's `validate()` checks relations
between fields. Defaults are the quick CPU demo on the embedded fortunes dataset.
"""

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional

from tf_effitrain.config.choices import (
    ACTIVATIONS,
    ATTENTION_KINDS,
    BATCHING,
    DECAYS,
    DELEGATES,
    EXPORT_FORMATS,
    ENGINES,
    MODEL_KINDS,
    NORM_POSITIONS,
    NORMS,
    OPTIMIZERS,
    PRECISIONS,
    QUANTIZATIONS,
    SOURCES,
    STRATEGIES,
    VOCAB_LEARNERS,
)
from tf_effitrain.errors import ConfigError

__all__ = [
    "RuntimeConfig",
    "DataConfig",
    "ModelConfig",
    "OptimizerConfig",
    "ScheduleConfig",
    "TrainingConfig",
    "ExportConfig",
    "DistillationConfig",
    "StructuredConfig",
    "LowRankConfig",
    "PruningConfig",
    "CompressionConfig",
    "ExperimentConfig",
    "ConfigError",
]


def _f(default, **meta):
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RuntimeConfig:
    """Where and how the job runs.

    Args:
        engine: str. `"keras3"` (default) or `"tf_keras"` (the engine tfmot needs).
        precision: str. Global dtype policy: `"auto"` (bfloat16 on TPUs, GPUs of compute
            capability >= 8.0 and CPUs with avx512_bf16/AMX; float16 with loss scaling
            on GPUs of capability 7.x; else float32), `"float32"`, `"mixed_bfloat16"`,
            `"mixed_float16"` or `"bfloat16"` (variables too). Softmax, normalization,
            the loss and the logits stay float32.
        strategy: str. `"auto"` (a TF_CONFIG cluster -> multi_worker, a TPU -> tpu,
            several GPUs -> mirrored, one GPU -> one_device, else default),
            `"default"`, `"one_device"`, `"mirrored"`, `"multi_worker"` or `"tpu"`.
        tpu_address: str or None. TPU name/address for `TPUClusterResolver`; None tries
            the local TPU VM, then the environment (Colab TPU node).
        seed: int. Seeds data splits, shuffling, augmentation and initialisation.
        deterministic: bool. Deterministic ops (`tf.config.experimental.
            enable_op_determinism`) and, in tf_keras, dropout drawn from checkpointed
            `tf.random.Generator` states: the same config gives bitwise the same
            weights, also across a kill and resume. Slower on some ops.
    """

    engine: str = _f("keras3", choices=ENGINES)
    precision: str = _f("auto", choices=PRECISIONS)
    strategy: str = _f("auto", choices=STRATEGIES)
    tpu_address: Optional[str] = _f(None)
    seed: int = _f(42, min=0)
    deterministic: bool = _f(False)

    def validate(self):
        pass


@dataclass
class DataConfig:
    """Where examples come from and how they become batches.

    Args:
        source: str. `"jsonl"`, `"csv"`, `"tfrecord"` (`tf.train.Example`s), `"text_dir"`
            (one folder per class) or `"tfds"`.
        path: str. File or directory for `jsonl`, `csv`, `tfrecord`, `text_dir`. The
            file sources also take a glob pattern of shards (`data/train-*.jsonl.gz`)
            or a comma-separated list; `.gz` files are read through gzip. Relative
            paths resolve against the working directory.
        split: str. How examples are split into train / validation / test:
            `"stratified"` (per class, seeded: needs every label in memory),
            `"hash"` (by a hash of each example's text: stable across runs and
            machines, duplicates stay together, needs nothing in memory), `"files"`
            (`path` is the training data, `validation_path` / `test_path` the others)
            or `"auto"`: `files` when `validation_path` or `test_path` is set, else
            `hash` when streaming, else `stratified`.
        validation_path: str or None. Validation files (like `path`) for `split: files`.
        test_path: str or None. Test files (like `path`) for `split: files`.
        stream: bool. Read the files as a stream every epoch instead of holding the
            corpus in memory: one quick pass checks labels and counts examples, the
            vocabulary is learned from a bounded sample, and training starts without
            tokenizing the corpus first (docs/guide.md, "Large datasets").
        tfds_name: str. A tensorflow-datasets name for `source: tfds`, e.g. `imdb_reviews`.
        tfds_split: str. The tfds split all examples are read from.
        text_field: str. Column / key / tfds feature holding the text.
        label_field: str. Column / key / tfds feature holding the label.
        classes: list of str or None. Class names in label-index order. `None` infers
            them: tfds ClassLabel names, else the sorted distinct labels.
        val_fraction: float. Fraction of examples held out for validation.
        test_fraction: float. Fraction of examples held out for the final test.
        max_examples: int or None. Keep at most this many examples (after shuffling).
        vocab_size: int. WordPiece vocabulary size learned on the training split.
        vocab_learner: str. `"tokenizers"` (the `tokenizers` package's WordPiece trainer:
            fast, the default) or `"keras_hub"` (keras-hub's learner); both deterministic
            and both read by the same tokenizer (docs/guide.md, "Data").
        vocab_sample: int or None. Learn the vocabulary from at most this many training
            texts (a uniform sample seeded by `runtime.seed`); None: all of them.
        vocab_file: str or None. Use this WordPiece vocabulary (one token per line,
            `[PAD]` first, `[UNK]` among them) instead of learning one.
        vocab_cache: bool. Share learned vocabularies between runs (keyed by the sampled
            texts and the learner settings) in `$TF_EFFITRAIN_CACHE/vocab`, by default
            `~/.cache/tf_effitrain/vocab`: a sweep on the same data learns it once.
        lowercase: bool. Lower-case text before WordPiece.
        max_length: int. Sequences are truncated to this many tokens.
        batching: str. `"bucket"` (length buckets, the default), `"fixed"` (every
            batch padded to `max_length`: static shapes for TPU) or `"pack"` (several
            examples per row of `max_length`, each attending within itself: almost no
            padding computed, static shapes; `model.kind: transformer` only; see
            docs/performance.md).
        batch_size: int. Examples each replica processes at once (a micro-batch when
            `training.accumulation_steps` > 1; also the evaluation batch size). The
            global batch is `batch_size x replicas x accumulation_steps`. With
            `batching: pack` a batch holds the rows that fit about this many examples.
        max_segments: int or None. `batching: pack`: most examples packed into one
            row (the packed model's logits slots); None: `min(32, max_length)`. Packed
            batches always have one static shape: `drop_remainder` and
            `bucket_boundaries` do not apply to them.
        bucket_boundaries: list of int or None. Upper sequence lengths of the buckets;
            `None` uses powers of two from 16 up to `max_length`.
        drop_remainder: bool. Drop the last, short training batch (static shapes).
        token_shuffle: float. Probability that a training example's tokens are shuffled
            ("confusion training" augmentation); 0 disables it.
        shuffle_buffer: int. tf.data shuffle buffer for the training split.
        class_weight: str or None. `"balanced"`: each training example weighs
            `n / (classes x count[its class])` in the loss (scikit-learn's balanced
            weights, from the training split), so every class carries the same total
            weight; None: all examples weigh 1. Validation and test are not weighted.
    """

    source: str = _f("jsonl", choices=SOURCES)
    path: str = _f("data/fortunes/fortunes.jsonl")
    split: str = _f("auto", choices=("auto", "stratified", "hash", "files"))
    validation_path: Optional[str] = _f(None)
    test_path: Optional[str] = _f(None)
    stream: bool = _f(False)
    tfds_name: str = _f("")
    tfds_split: str = _f("train")
    text_field: str = _f("text")
    label_field: str = _f("label")
    classes: Optional[List[str]] = _f(None)
    val_fraction: float = _f(0.1, min=0.0, max=0.5)
    test_fraction: float = _f(0.1, min=0.0, max=0.5)
    max_examples: Optional[int] = _f(None, min=1)
    vocab_size: int = _f(4000, min=16)
    vocab_learner: str = _f("tokenizers", choices=VOCAB_LEARNERS)
    vocab_sample: Optional[int] = _f(50000, min=1)
    vocab_file: Optional[str] = _f(None)
    vocab_cache: bool = _f(True)
    lowercase: bool = _f(True)
    max_length: int = _f(128, min=2)
    batching: str = _f("bucket", choices=BATCHING)
    batch_size: int = _f(32, min=1)
    max_segments: Optional[int] = _f(None, min=1)
    bucket_boundaries: Optional[List[int]] = _f(None)
    drop_remainder: bool = _f(False)
    token_shuffle: float = _f(0.0, min=0.0, max=1.0)
    shuffle_buffer: int = _f(10000, min=1)
    class_weight: Optional[str] = _f(None, choices=("balanced",))

    @property
    def segments_per_row(self):
        """`max_segments`, or its default `min(32, max_length)`."""
        return self.max_segments or min(32, self.max_length)

    @property
    def split_method(self):
        """`split` with `"auto"` resolved."""
        if self.split != "auto":
            return self.split
        if self.validation_path or self.test_path:
            return "files"
        return "hash" if self.stream else "stratified"

    def validate(self):
        method = self.split_method
        if method == "files" and self.source not in ("jsonl", "csv", "tfrecord"):
            raise ConfigError(
                "`data.split: files` needs a file source (jsonl, csv or tfrecord). "
                f"Received: data.source={self.source!r}. Use `data.split: hash`.")
        if method == "files" and not (self.validation_path or self.test_path):
            raise ConfigError(
                "`data.split: files` needs `data.validation_path` or `data.test_path`. "
                "Received: neither.")
        if method != "files" and (self.validation_path or self.test_path):
            raise ConfigError(
                "`data.validation_path` / `data.test_path` are read only with "
                f"`data.split: files` (or auto). Received: data.split={self.split!r}")
        if self.stream and method == "stratified":
            raise ConfigError(
                "`data.split: stratified` needs every label in memory, which "
                "`data.stream: true` avoids. Use `data.split: hash` or `files`.")
        if self.stream and self.max_examples is not None:
            raise ConfigError(
                "`data.max_examples` picks examples from the whole corpus in memory; with "
                "`data.stream: true` point `data.path` at fewer files instead. Received: "
                f"max_examples={self.max_examples}")
        if self.source == "tfds" and not self.tfds_name:
            raise ConfigError(
                "`data.tfds_name` must be set when `data.source` is 'tfds'. "
                "Received: data.tfds_name=''"
            )
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ConfigError(
                "`data.val_fraction + data.test_fraction` must be < 1. Received: "
                f"{self.val_fraction} + {self.test_fraction}"
            )
        if (self.batching == "pack" and self.max_segments is not None
                and self.max_segments > self.max_length):
            raise ConfigError(
                "`data.max_segments` must be <= `data.max_length` (a row holds at most "
                f"one example per token). Received: max_segments={self.max_segments}, "
                f"max_length={self.max_length}")
        if self.bucket_boundaries is not None:
            b = self.bucket_boundaries
            if not b or any(x < 1 for x in b) or sorted(set(b)) != list(b):
                raise ConfigError(
                    "`data.bucket_boundaries` must be strictly increasing positive "
                    f"integers. Received: data.bucket_boundaries={b}"
                )


@dataclass
class ModelConfig:
    """The Transformer encoder classifier.

    Args:
        kind: str. `"transformer"` (this toolkit's builder, both engines) or
            `"bert_backbone"` (keras-nlp `BertBackbone`, Keras 3 engine only).
        num_layers: int. Encoder blocks.
        d_model: int. Hidden size.
        num_heads: int. Attention heads; must divide `d_model`.
        ffn_dim: int. Inner size of the feed-forward network.
        dropout: float. Dropout rate on embeddings, attention output and FFN output.
        activation: str. FFN activation.
        norm: str. `"layer"`, `"batch"` or `"rms"`.
        norm_position: str. `"pre"` (norm before each sub-layer) or `"post"`.
        share_layers: bool. ALBERT-style: one block's weights reused by every layer.
        shared_kv: bool. One projection serves as both keys and values.
        embedding_rank: int or None. Factorized embedding `vocab x rank` then
            `rank x d_model`; `None` uses a full `vocab x d_model` table.
        attention: str. `"full"`, `"local"` (each token sees `window` tokens either
            side) or `"block_sparse"` (tokens attend within blocks of `block_size`).
        window: int. Half-width of the local attention window.
        block_size: int. Block length for block-sparse attention.
        preset: str or None. `bert_backbone` only: a local keras-hub preset directory
            to load (no download); `None` builds a randomly initialised backbone.
        layer_heads: list of int or None. Heads kept in each encoder layer (one entry
            per layer, or one with `share_layers`; written by structured compression,
            docs/compression.md); the head size stays `d_model / num_heads`. None:
            `num_heads` everywhere.
        layer_ffn_dims: list of int or None. FFN width of each encoder layer (written
            by structured compression). None: `ffn_dim` everywhere.
        low_rank: list of str. `"layer_name:rank"` entries (written by low-rank
            factorization): those Dense layers are built as two factors `in x rank`
            and `rank x out`, e.g. `"block0_ffn_inner:32"`.
    """

    kind: str = _f("transformer", choices=MODEL_KINDS)
    num_layers: int = _f(2, min=1)
    d_model: int = _f(128, min=1)
    num_heads: int = _f(4, min=1)
    ffn_dim: int = _f(256, min=1)
    dropout: float = _f(0.1, min=0.0, max=0.9)
    activation: str = _f("gelu", choices=ACTIVATIONS)
    norm: str = _f("layer", choices=NORMS)
    norm_position: str = _f("pre", choices=NORM_POSITIONS)
    share_layers: bool = _f(False)
    shared_kv: bool = _f(False)
    embedding_rank: Optional[int] = _f(None, min=1)
    attention: str = _f("full", choices=ATTENTION_KINDS)
    window: int = _f(16, min=1)
    block_size: int = _f(16, min=1)
    preset: Optional[str] = _f(None)
    layer_heads: Optional[List[int]] = _f(None)
    layer_ffn_dims: Optional[List[int]] = _f(None)
    low_rank: List[str] = _f([])

    def validate(self):
        if self.d_model % self.num_heads:
            raise ConfigError(
                "`model.d_model` must be divisible by `model.num_heads`. Received: "
                f"d_model={self.d_model}, num_heads={self.num_heads}"
            )
        layers = 1 if self.share_layers else self.num_layers
        for key, values, top in (("layer_heads", self.layer_heads, self.num_heads),
                                 ("layer_ffn_dims", self.layer_ffn_dims, None)):
            if values is None:
                continue
            if len(values) != layers or any(v < 1 or (top and v > top) for v in values):
                raise ConfigError(
                    f"`model.{key}` must hold {layers} value(s) (one per "
                    f"{'shared block' if self.share_layers else 'layer'}), each >= 1"
                    + (f" and <= model.num_heads ({top})" if top else "")
                    + f". Received: model.{key}={values}")
        roles = ("_query", "_key", "_value", "_key_value", "_attention_output",
                 "_ffn_inner", "_ffn_output")
        names = [entry.partition(":")[0] for entry in self.low_rank]
        for entry in self.low_rank:
            name, _, rank = entry.partition(":")
            if not name or not rank.isdigit() or int(rank) < 1:
                raise ConfigError(
                    "`model.low_rank` entries must look like 'layer_name:rank' (e.g. "
                    f"'block0_ffn_inner:32'). Received: {entry!r}")
            if not name.startswith(("block", "shared_block")) or not name.endswith(roles):
                raise ConfigError(
                    "`model.low_rank` factorizes the encoder's projection layers only "
                    f"(blockN_ / shared_block_ + {', '.join(r[1:] for r in roles)}). "
                    f"Received: {entry!r}")
            if names.count(name) > 1:
                raise ConfigError(f"`model.low_rank` names {name!r} twice. Received: "
                                  f"{self.low_rank}")
        if self.embedding_rank is not None and self.embedding_rank >= self.d_model:
            raise ConfigError(
                "`model.embedding_rank` must be smaller than `model.d_model` (else "
                f"factorization adds parameters). Received: embedding_rank="
                f"{self.embedding_rank}, d_model={self.d_model}"
            )


@dataclass
class OptimizerConfig:
    """The optimizer.

    Args:
        name: str. `"adamw"`, `"adafactor"`, `"lamb"`, `"lion"` or `"sgd"`.
        learning_rate: float. Peak learning rate (reached at the end of warmup).
        weight_decay: float. Decoupled weight decay.
        beta_1: float. First-moment decay (AdamW, LAMB, Lion) / momentum (SGD).
        beta_2: float. Second-moment decay (AdamW, LAMB, Lion).
        epsilon: float. Numerical stability term.
        global_clipnorm: float or None. Clip gradients to this global norm.
        exclude_from_weight_decay: list of str. Variables whose name contains one of
            these substrings get no weight decay (norms and biases by default).
        ema_momentum: float or None. Keep an exponential moving average of the weights
            with this momentum (updated once per applied update); `None` disables it.
    """

    name: str = _f("adamw", choices=OPTIMIZERS)
    learning_rate: float = _f(1e-3, min=0.0)
    weight_decay: float = _f(0.01, min=0.0)
    beta_1: float = _f(0.9, min=0.0, max=1.0)
    beta_2: float = _f(0.999, min=0.0, max=1.0)
    epsilon: float = _f(1e-7, min=0.0)
    global_clipnorm: Optional[float] = _f(1.0, min=0.0)
    exclude_from_weight_decay: List[str] = _f(["bias", "norm", "gamma", "beta", "scale"])
    ema_momentum: Optional[float] = _f(None, min=0.0, max=1.0)

    def validate(self):
        pass


@dataclass
class ScheduleConfig:
    """Learning-rate schedule: linear warmup, then decay. Counted in applied updates.

    Args:
        name: str. Decay after warmup: `"constant"`, `"cosine"`, `"linear"`,
            `"exponential"` or `"polynomial"`.
        warmup_steps: int or None. Updates of linear warmup from 0 to the peak; `None`
            uses `warmup_fraction` of all updates.
        warmup_fraction: float. Warmup length as a fraction of all updates.
        decay_steps: int or None. Updates over which to decay after warmup; `None`
            decays over the rest of training.
        alpha: float. Final learning rate as a fraction of the peak (cosine, linear,
            polynomial).
        decay_rate: float. Exponential: multiply by this every `decay_steps` updates.
        power: float. Polynomial decay power.
    """

    name: str = _f("cosine", choices=DECAYS)
    warmup_steps: Optional[int] = _f(None, min=0)
    warmup_fraction: float = _f(0.1, min=0.0, max=1.0)
    decay_steps: Optional[int] = _f(None, min=1)
    alpha: float = _f(0.0, min=0.0, max=1.0)
    decay_rate: float = _f(0.1, min=0.0, max=1.0)
    power: float = _f(1.0, min=0.0)

    def validate(self):
        pass


@dataclass
class TrainingConfig:
    """The `fit` loop and what it writes.

    Args:
        epochs: int. Passes over the training split.
        run_dir: str. Where the run directory is written.
        steps_per_epoch: int or None. Limit updates per epoch; `None` uses the whole split.
        early_stopping_patience: int or None. Stop after this many epochs without an
            improvement of `best_metric`.
        keep_best: bool. Keep (and save) the weights of the epoch with the best
            `best_metric` instead of the last epoch's; the report names that epoch.
            Needs a validation split; without one the last weights are kept.
        best_metric: str. The validation metric that picks the best epoch and drives
            early stopping: `"val_accuracy"` (higher is better; the default, because
            accuracy is what a classifier is judged on, and the validation loss of a
            classifier often rises from over-confidence while its accuracy still
            improves), `"val_macro_f1"` (higher is better: every class counts the same,
            what an imbalanced task is judged on) or `"val_loss"` (lower is better).
        accumulation_steps: int. Micro-batches of `data.batch_size` per optimizer update:
            the effective batch is `data.batch_size x accumulation_steps` while memory
            stays at one micro-batch. The update equals the large-batch update with
            dense gradients (docs/accumulation.md).
        jit_compile: bool. XLA-compile the train step (with any batching: XLA compiles
            one program per batch shape, so bucketed batches compile once per bucket
            and short-batch size).
        steps_per_execution: int. Training steps run per `tf.function` call (fewer
            host round trips; mostly useful on TPUs).
        verbose: int. Keras progress bar: 0 silent, 1 bar, 2 one line per epoch.
        checkpoint_every: int or None. Also write a resumable checkpoint every this
            many updates (besides every epoch end); at most this many updates are lost
            by a crash. None: epoch ends only. With `steps_per_execution` > 1,
            checkpoints are written at epoch ends only.
        keep_checkpoints: int. Resumable checkpoints kept (newest first); 2 or more
            lets a damaged newest one fall back to the previous.
        nonfinite: str. A NaN/Inf loss (or weights): `"stop"` ends training with an
            error naming the update, keeping the last good checkpoint; `"warn"` logs
            it once and goes on. Under `mixed_float16` the loss scale already skips
            updates whose gradients overflow.
    """

    epochs: int = _f(5, min=1)
    run_dir: str = _f("runs/demo")
    steps_per_epoch: Optional[int] = _f(None, min=1)
    early_stopping_patience: Optional[int] = _f(None, min=1)
    keep_best: bool = _f(True)
    best_metric: str = _f("val_accuracy", choices=("val_accuracy", "val_macro_f1", "val_loss"))
    accumulation_steps: int = _f(1, min=1)
    jit_compile: bool = _f(False)
    steps_per_execution: int = _f(1, min=1)
    verbose: int = _f(1, choices=(0, 1, 2))
    checkpoint_every: Optional[int] = _f(100, min=1)
    keep_checkpoints: int = _f(2, min=1)
    nonfinite: str = _f("stop", choices=("stop", "warn"))

    def validate(self):
        pass


@dataclass
class ExportConfig:
    """Export after training (also the defaults of `tf-effitrain export RUN_DIR`).

    Args:
        quantize: list of str. TFLite files to write: `"none"` (float32), `"float16"`,
            `"dynamic"` (int8 weights) and/or `"int8"` (full integer); empty: no export
            after `train`.
        formats: list of str. `"tflite"` and/or `"saved_model"`.
        sequence_length: int or None. The files' fixed input length; None: the run's
            `data.max_length`.
        representative_samples: int. Training examples that calibrate int8 ranges.
        allow_flex: bool. Accept ops that need the Flex (Select TF ops) delegate.
        threads: int. Interpreter threads for the verification's latency figures.
        delegates: list of str. Verify under `"xnnpack"` (the default resolver) and/or
            `"none"` (builtin kernels only).
        debug_quantization: bool. Add a per-layer float-vs-int8 error table.
    """

    quantize: List[str] = _f([])
    formats: List[str] = _f(["tflite"])
    sequence_length: Optional[int] = _f(None, min=1)
    representative_samples: int = _f(200, min=1)
    allow_flex: bool = _f(False)
    threads: int = _f(1, min=1)
    delegates: List[str] = _f(["xnnpack", "none"])
    debug_quantization: bool = _f(False)

    def validate(self):
        for key, values, choices in (("quantize", self.quantize, QUANTIZATIONS),
                                     ("formats", self.formats, EXPORT_FORMATS),
                                     ("delegates", self.delegates, DELEGATES)):
            bad = [v for v in values if v not in choices]
            if bad:
                raise ConfigError(f"`export.{key}` items must be among {list(choices)}. "
                                  f"Received: export.{key}={values}")
        if not self.delegates:
            raise ConfigError("`export.delegates` must name at least one of "
                              f"{list(DELEGATES)}. Received: export.delegates=[]")


@dataclass
class StructuredConfig:
    """Head and FFN-neuron removal (structured pruning): a smaller model, not masks.

    Args:
        heads_fraction: float in [0, 1). Share of attention heads to remove.
        neurons_fraction: float in [0, 1). Share of FFN neurons to remove.
        method: str. `"taylor"` (first-order loss change of removing a unit, from
            gradients on `score_batches` training batches) or `"magnitude"` (weights).
        scope: str. `"layer"` (the same share in every layer) or `"global"` (one
            ranking over layers, scores normalized per layer).
        score_batches: int. Training batches the Taylor scores are accumulated over.
        iterations: int. Remove gradually: `iterations` rounds of removing a further
            share, each followed by `compression.fine_tune_epochs / iterations`
            epochs; 1 is one-shot then fine-tune.
    """

    heads_fraction: float = _f(0.0, min=0.0, max=0.95)
    neurons_fraction: float = _f(0.0, min=0.0, max=0.95)
    method: str = _f("taylor", choices=("taylor", "magnitude"))
    scope: str = _f("layer", choices=("layer", "global"))
    score_batches: int = _f(20, min=1)
    iterations: int = _f(1, min=1)

    def validate(self):
        pass

    @property
    def enabled(self):
        return self.heads_fraction > 0 or self.neurons_fraction > 0


@dataclass
class LowRankConfig:
    """Truncated-SVD factorization of chosen Dense kernels.

    Args:
        layers: list of str. `fnmatch` patterns on encoder layer names: `"*_ffn_*"`
            (both FFN layers), `"*_query"`, `"block0_*"`, ...
        rank: int or None. One rank for every chosen kernel.
        rank_fraction: float or None. Rank as a share of each kernel's full rank.
        energy: float or None. Smallest rank keeping this share of the squared
            singular values. Set exactly one of the three to factorize.
    """

    layers: List[str] = _f(["*_ffn_*"])
    rank: Optional[int] = _f(None, min=1)
    rank_fraction: Optional[float] = _f(None, min=0.01, max=1.0)
    energy: Optional[float] = _f(None, min=0.01, max=1.0)

    def validate(self):
        if sum(v is not None for v in (self.rank, self.rank_fraction, self.energy)) > 1:
            raise ConfigError(
                "Set only one of `compression.low_rank.rank`, `rank_fraction` and "
                f"`energy`. Received: rank={self.rank}, rank_fraction="
                f"{self.rank_fraction}, energy={self.energy}")

    @property
    def enabled(self):
        return any(v is not None for v in (self.rank, self.rank_fraction, self.energy))


@dataclass
class PruningConfig:
    """Magnitude pruning with tfmot wrappers (tf_keras engine), during fine-tuning.

    Args:
        target_sparsity: float in [0, 1). Share of each pruned kernel set to zero;
            0: no unstructured pruning.
        schedule: str. `"polynomial"` (sparsity rises from `initial_sparsity` to the
            target, cubic) or `"constant"` (the target from `begin_step` on).
        begin_step: int. First pruning update (applied updates, not micro-batches).
        end_step: int or None. Update where the polynomial schedule reaches the target;
            None: at `end_fraction` of the fine-tuning's updates.
        end_fraction: float in (0, 1]. See `end_step`; the updates after it train the
            final mask.
        frequency: int. Updates between mask recomputations.
        initial_sparsity: float. Polynomial: the sparsity at `begin_step`.
        m_by_n: [m, n] or None. Structured m:n sparsity instead: m of every n
            consecutive input weights of each output unit are zero (tfmot's convention:
            `[2, 4]` is 2:4, `[1, 4]` keeps 3 of 4), fixed at the first update
            (`begin_step` must be 0).
        layers: list of str. `fnmatch` patterns on layer names: by default every Dense
            of the encoder (attention query/key/value/output, FFN) and the embedding
            projection.
        embedding: bool. Also prune the token embedding table.
        head: bool. Also prune the classifier head (`logits`).
    """

    target_sparsity: float = _f(0.0, min=0.0, max=0.99)
    schedule: str = _f("polynomial", choices=("polynomial", "constant"))
    begin_step: int = _f(0, min=0)
    end_step: Optional[int] = _f(None, min=1)
    end_fraction: float = _f(0.7, min=0.01, max=1.0)
    frequency: int = _f(10, min=1)
    initial_sparsity: float = _f(0.0, min=0.0, max=0.99)
    m_by_n: Optional[List[int]] = _f(None)
    layers: List[str] = _f(["block*", "embedding_projection"])
    embedding: bool = _f(False)
    head: bool = _f(False)

    def validate(self):
        if self.m_by_n is not None:
            if len(self.m_by_n) != 2 or not 0 < self.m_by_n[0] < self.m_by_n[1]:
                raise ConfigError(
                    "`compression.pruning.m_by_n` must be [m, n] with 0 < m < n, e.g. "
                    f"[2, 4]. Received: m_by_n={self.m_by_n}")
            if self.begin_step:
                raise ConfigError(
                    "`compression.pruning.m_by_n` masks are set at the first update "
                    "(tfmot): `begin_step` must be 0. Received: begin_step="
                    f"{self.begin_step}")
            if self.target_sparsity:
                raise ConfigError(
                    "Set either `compression.pruning.target_sparsity` (unstructured) or "
                    "`compression.pruning.m_by_n` (m:n), not both. Received: "
                    f"target_sparsity={self.target_sparsity}, m_by_n={self.m_by_n}")
        if self.initial_sparsity > self.target_sparsity and self.target_sparsity:
            raise ConfigError(
                "`compression.pruning.initial_sparsity` must be <= `target_sparsity`. "
                f"Received: initial_sparsity={self.initial_sparsity}, "
                f"target_sparsity={self.target_sparsity}")
        if self.end_step is not None and self.end_step <= self.begin_step:
            raise ConfigError(
                "`compression.pruning.end_step` must be > `begin_step`. Received: "
                f"begin_step={self.begin_step}, end_step={self.end_step}")

    @property
    def enabled(self):
        return self.target_sparsity > 0 or self.m_by_n is not None


@dataclass
class CompressionConfig:
    """Compression of a finished run (`tf-effitrain compress RUN_DIR`, or after `train`).

    Args:
        structured: `StructuredConfig`. Heads and FFN neurons removed.
        low_rank: `LowRankConfig`. Kernels factorized (after the structured step).
        pruning: `PruningConfig`. tfmot magnitude pruning (unstructured or m:n) while
            fine-tuning, in the tf_keras engine (after the structured steps).
        qat: bool. Quantization-aware training (tfmot, tf_keras engine, float32) last,
            pruning-preserving when the model was pruned; writes `model_int8.tflite`.
        qat_epochs: int. Epochs of quantization-aware training.
        fine_tune_epochs: int. Epochs of fine-tuning the compact (or pruned) model.
        distill: bool. Fine-tune with the uncompressed run as teacher (the
            `distillation:` section's alpha and temperature).
        run_dir: str or None. Where the compact run goes; None: `<run_dir>_compressed`.
        tflite_latency: bool. Also measure batch-1 latency of both models as float32
            TFLite files (XNNPack, one thread): the deployed form.
    """

    structured: StructuredConfig = field(default_factory=StructuredConfig)
    low_rank: LowRankConfig = field(default_factory=LowRankConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    qat: bool = _f(False)
    qat_epochs: int = _f(1, min=1)
    fine_tune_epochs: int = _f(3, min=1)
    distill: bool = _f(False)
    run_dir: Optional[str] = _f(None)
    tflite_latency: bool = _f(True)

    def validate(self):
        self.structured.validate()
        self.low_rank.validate()
        self.pruning.validate()
        if self.structured.enabled and self.fine_tune_epochs < self.structured.iterations:
            raise ConfigError(
                "`compression.fine_tune_epochs` must be >= `compression.structured."
                "iterations` (each round fine-tunes at least one epoch). Received: "
                f"fine_tune_epochs={self.fine_tune_epochs}, iterations="
                f"{self.structured.iterations}")

    @property
    def enabled(self):
        return self.structured.enabled or self.low_rank.enabled or self.tfmot

    @property
    def tfmot(self):
        """Whether a tensorflow-model-optimization stage (pruning, QAT) is asked for."""
        return self.pruning.enabled or self.qat


@dataclass
class DistillationConfig:
    """Knowledge distillation from a finished run (`tf-effitrain distill CONFIG`).

    The student is built from the `model:` section and trained on the teacher run's
    data (same splits and vocabulary: the data settings that decide them must equal the
    teacher's). Only the student is saved.

    Args:
        teacher: str. A teacher run directory (written by `tf-effitrain train`); empty:
            no distillation.
        alpha: float in [0, 1]. Weight of the student's own loss on the labels; the
            soft-target (teacher) term gets `1 - alpha`.
        temperature: float > 0. Softening temperature of both distributions.
        scale_by_t2: bool. Multiply the soft-target term by `temperature**2`.
        precompute_teacher: bool or None. Run the teacher once over the training split
            and feed its logits with the data (the teacher then costs one pass in
            total); `None`: do so unless token shuffle or hidden-state terms need the
            live teacher; `true` refuses those combinations.
        hidden_layers: list of [student_layer, teacher_layer] name pairs. Adds the
            mean-squared error between their outputs (a learned projection bridges
            different widths), e.g. `[[final_norm, final_norm]]`.
        hidden_weight: float. Weight of the hidden-state terms.
    """

    teacher: str = _f("")
    alpha: float = _f(0.5, min=0.0, max=1.0)
    temperature: float = _f(2.0, min=0.01)
    scale_by_t2: bool = _f(True)
    precompute_teacher: Optional[bool] = _f(None)
    hidden_layers: List[List[str]] = _f([])
    hidden_weight: float = _f(1.0, min=0.0)

    def validate(self):
        for pair in self.hidden_layers:
            if len(pair) != 2:
                raise ConfigError(
                    "`distillation.hidden_layers` items must be [student_layer, "
                    f"teacher_layer] pairs. Received: {pair!r}")


@dataclass
class ExperimentConfig:
    """A whole experiment: one YAML file, one dataclass per top-level section."""

    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)

    def validate(self):
        for f in dataclasses.fields(self):
            getattr(self, f.name).validate()
        distill = self.distillation
        if distill.teacher and distill.precompute_teacher:
            for reason, bad in (("`data.token_shuffle` > 0 changes every epoch's inputs",
                                 self.data.token_shuffle > 0),
                                ("`distillation.hidden_layers` needs the teacher's hidden "
                                 "states", bool(distill.hidden_layers)),
                                ("`data.stream: true` keeps no per-example state",
                                 self.data.stream)):
                if bad:
                    raise ConfigError(
                        f"`distillation.precompute_teacher: true` cannot be used: "
                        f"{reason}, so cached teacher logits would be wrong. Set "
                        "`distillation.precompute_teacher: false` (the teacher runs on "
                        "every batch) or null (chooses for you).")
        if self.model.kind != "transformer" and (self.model.layer_heads or
                                                 self.model.layer_ffn_dims or self.model.low_rank):
            raise ConfigError(
                "`model.layer_heads`, `layer_ffn_dims` and `low_rank` apply to `model.kind: "
                f"transformer` only. Received: model.kind={self.model.kind!r}")
        if self.compression.tfmot and self.model.kind != "transformer":
            raise ConfigError(
                "`compression.pruning` / `compression.qat` use tensorflow-model-optimization, "
                "which works on tf_keras models only, and a keras-hub backbone is Keras 3 "
                "only. Use `model.kind: transformer` (the toolkit's builder, both engines), "
                "or compress a keras-hub model after training with `export.quantize: "
                f"[dynamic]` / `[int8]`. Received: model.kind={self.model.kind!r}")
        if self.compression.pruning.enabled and self.model.share_layers:
            raise ConfigError(
                "`compression.pruning` cannot prune `model.share_layers: true`: tfmot "
                "advances a wrapper's step on every call, and a shared block is called "
                "once per layer. Use `compression.structured` / `low_rank` for this model. "
                "Received: model.share_layers=True")
        if self.compression.enabled and self.model.kind != "transformer":
            raise ConfigError(
                "`compression.structured` / `compression.low_rank` apply to `model.kind: "
                f"transformer` (the toolkit's builder). Received: model.kind="
                f"{self.model.kind!r}")
        if self.data.batching == "pack":
            for reason, bad in (
                    (f"`model.kind: {self.model.kind}` has no packed inputs (keras-hub's "
                     "backbone attends across the whole row)",
                     self.model.kind != "transformer"),
                    ("distillation feeds the teacher one example per row",
                     bool(self.distillation.teacher))):
                if bad:
                    raise ConfigError(
                        f"`data.batching: pack` cannot be used here: {reason}. Use "
                        "`data.batching: bucket`.")
        if self.model.kind == "bert_backbone" and self.runtime.engine != "keras3":
            raise ConfigError(
                "`model.kind: bert_backbone` needs `runtime.engine: keras3` (keras-nlp "
                f"is Keras 3 only). Received: runtime.engine={self.runtime.engine!r}"
            )
        return self

    def to_dict(self):
        return dataclasses.asdict(self)
