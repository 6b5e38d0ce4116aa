"""How much memory a training job needs: an upper estimate made from the spec and the models'
``config.json`` before anything is loaded, so that a job that cannot fit the worker class it is
queued for is refused at submit instead of running out of memory in the queue.

The estimate, for float32 training with AdamW (the engine's optimiser; bf16 autocast on CUDA
only lowers it):

- **parameters**: the teacher's weights (4 bytes each; the engine always loads it) and the
  student's weights, gradients and AdamW's two moments (4 + 4 + 8 = 16 bytes each).
- **activations**: what the student keeps for its backward pass, per transformer layer
  ``B*T*d*102 + B*heads*T*T*15`` bytes (Korthikanti et al. 2022, "Reducing Activation
  Recomputation in Large Transformer Models", section 4.1: ``34*T*B*d + 5*heads*T^2*B`` bytes
  per layer in 16-bit, doubled for float32 and multiplied by 1.5 after the measurement below),
  plus, when the method runs the teacher, its
  no-grad outputs (every hidden state and attention map, as the intermediate-layer methods read
  them) and one layer's working set; or, when larger, an evaluation forward at
  ``eval_batch_size``. ``T`` is ``training.max_seq_length`` (batches are padded to their longest
  text, so this is an upper bound).
- **runtime**: a fixed :data:`RUNTIME_BYTES` for the worker process itself.

Not counted: a method's extra modules (projections, CRD memory banks), an augmentation
generator (:mod:`kd_engine.augment.memory` checks those on the worker), and the assistants of a
multi-hop method (each is at most the teacher's size and trains alone).

Measured against real runs: a ``finetune`` of ``builtin:minilm-l6`` (22.7 M parameters) on a
CPU worker (torch, 2 threads), on a CSV of 400-word texts so that every batch is padded to
``max_seq_length``, ``eval_batch_size`` = ``batch_size``, 3 optimiser steps and the evaluations
and export that follow; the peak resident memory of the whole process (``resource.getrusage``
``ru_maxrss``; 0.44 GB of it before the job starts):

==========  ======================  =========================  ==================
B x T       Korthikanti x 2 (fp32)  this estimate (total)      measured peak RSS
==========  ======================  =========================  ==================
32 x 128    activations 1.03 GB     3.07 GB                    2.42 GB
64 x 256    activations 5.64 GB     9.96 GB                    8.76 GB
==========  ======================  =========================  ==================

The process grew by 1.98 GB and 8.32 GB: the parameters (0.45 GB), about 0.1 GB, and 1.38
times the float32 Korthikanti activations; hence :data:`MEASURED_FACTOR`. With it the estimate
is 14-27 % above the measured peaks.
"""

from __future__ import annotations

from dataclasses import dataclass

from kd_engine.models.shapes import ModelShape, planned_student_shape, shape_from_config
from kd_engine.students_spec import (
    BiLSTMStudent,
    CNNStudent,
    FreshStudent,
    FromTeacherStudent,
    PretrainedStudent,
)

FLOAT_BYTES = 4
TRAINED_BYTES_PER_PARAMETER = 4 * FLOAT_BYTES
"""A trained float32 parameter: its weight, its gradient and AdamW's two moments."""
MEASURED_FACTOR = 1.5
"""Korthikanti's counts, doubled for float32, were 1.38 times below the activations measured on
a CPU worker (PyTorch's eager attention keeps float32 masks and an expanded attention mask; see
the table in the module docstring); they are multiplied by this, rounded up."""
ACTIVATION_BYTES_PER_TOKEN_UNIT = 102
"""Bytes a transformer layer keeps per token and hidden unit for the backward pass (float32):
34 in 16-bit (Korthikanti et al. 2022, attention scores excluded), doubled, times
:data:`MEASURED_FACTOR`."""
ATTENTION_BYTES_PER_SCORE = 15
"""Bytes a transformer layer keeps per attention score (B x heads x T x T) for the backward
pass (float32): 5 in 16-bit (scores, softmax, dropout mask and output), doubled, times
:data:`MEASURED_FACTOR`."""
RUNTIME_BYTES = 1024**3
"""A fixed allowance for the worker process itself: the Python, torch and transformers code and
their buffers (a CPU worker's resident memory is about 0.45 GB before a job loads anything),
the tokenised data and the allocator's slack."""
GIB = 1024**3


@dataclass(frozen=True)
class ModelSize:
    """What the estimate needs of one model.

    Attributes:
        parameters: number of parameters.
        num_layers: L, transformer (or LSTM) layers.
        hidden_size: d, width of a layer's output (2 x units for a BiLSTM).
        num_heads: attention heads (0 for a model without attention).
        intermediate_size: width of the feed-forward inner layer (0 when none).
    """

    parameters: int
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int


@dataclass(frozen=True)
class MemoryEstimate:
    """The estimate of one job, in bytes.

    Attributes:
        teacher_bytes: the teacher's weights (always loaded: a ``finetune`` job's student
            starts from it).
        student_bytes: the student's weights, gradients and AdamW state.
        activation_bytes: activations at the peak (training step or evaluation forward).
        runtime_bytes: the worker process's own allowance (:data:`RUNTIME_BYTES`).
        teacher: the teacher's size.
        student: the student's size.
    """

    teacher_bytes: int
    student_bytes: int
    activation_bytes: int
    runtime_bytes: int
    teacher: ModelSize
    student: ModelSize

    @property
    def parameter_bytes(self) -> int:
        """Bytes of every parameter with its training state."""
        return self.teacher_bytes + self.student_bytes

    @property
    def total_bytes(self) -> int:
        """The whole estimate."""
        return self.parameter_bytes + self.activation_bytes + self.runtime_bytes


def transformer_parameters(
    vocab_size: int,
    hidden_size: int,
    num_layers: int,
    intermediate_size: int,
    max_positions: int = 512,
    type_vocab_size: int = 2,
    num_labels: int = 2,
) -> int:
    """Parameters of a BERT sequence classifier: embeddings (words, positions, token types,
    LayerNorm), per layer ``4d^2 + 2di + 9d + i`` (Q, K, V, output, feed-forward, biases, two
    LayerNorms), the pooler and the classifier. all-MiniLM-L6-v2 (30522, 384, 6, 1536) has
    22,713,216 without a classifier, which this gives."""
    d, i = hidden_size, intermediate_size
    embeddings = (vocab_size + max_positions + type_vocab_size) * d + 2 * d
    layer = 4 * d * d + 2 * d * i + 9 * d + i
    pooler = d * d + d
    classifier = d * num_labels + num_labels if num_labels else 0
    return embeddings + num_layers * layer + pooler + classifier


def _int(config: dict[str, object], key: str, default: int) -> int:
    value = config.get(key, default)
    return int(value) if isinstance(value, int | float | str) else default


def teacher_size(config: dict[str, object], num_labels: int) -> ModelSize:
    """The size of a transformer checkpoint from its ``config.json`` dict."""
    shape = shape_from_config(config, num_labels)
    intermediate = _int(config, "intermediate_size", 4 * shape.hidden_size)
    return ModelSize(
        parameters=transformer_parameters(
            _int(config, "vocab_size", 30522),
            shape.hidden_size,
            shape.num_layers,
            intermediate,
            _int(config, "max_position_embeddings", 512),
            _int(config, "type_vocab_size", 2),
            num_labels,
        ),
        num_layers=shape.num_layers,
        hidden_size=shape.hidden_size,
        num_heads=shape.num_heads or 1,
        intermediate_size=intermediate,
    )


def student_size(
    student: FromTeacherStudent | FreshStudent | PretrainedStudent | BiLSTMStudent | CNNStudent,
    teacher_config: dict[str, object],
    student_config: dict[str, object] | None,
    num_labels: int,
) -> ModelSize:
    """The size a student spec will have (the teacher's vocabulary; a pretrained student's
    own ``config.json`` dict, cut to its chosen layers).

    Raises:
        ValueError: as :func:`kd_engine.models.shapes.planned_student_shape`.
    """
    teacher = teacher_size(teacher_config, num_labels)
    vocab = _int(teacher_config, "vocab_size", 30522)
    positions = _int(teacher_config, "max_position_embeddings", 512)
    shape: ModelShape = planned_student_shape(
        student, shape_from_config(teacher_config, num_labels), student_config
    )
    if isinstance(student, BiLSTMStudent):
        h, e = student.hidden_size, teacher.hidden_size
        lstm = sum(
            2 * 4 * ((e if n == 0 else 2 * h) * h + h * h + 2 * h) for n in range(shape.num_layers)
        )
        params = vocab * e + lstm + 2 * h * h + h + h * num_labels + num_labels  # fc to h units
        return ModelSize(params, shape.num_layers, shape.hidden_size, 0, 0)
    if isinstance(student, CNNStudent):
        e, f = teacher.hidden_size, student.num_filters
        convs = sum(k * e * f + f for k in student.kernel_sizes)
        params = vocab * e + convs + shape.hidden_size * num_labels + num_labels
        return ModelSize(params, 1, shape.hidden_size, 0, 0)
    if isinstance(student, FreshStudent):
        intermediate = student.intermediate_size
    elif isinstance(student, PretrainedStudent) and student_config is not None:
        intermediate = _int(student_config, "intermediate_size", 4 * shape.hidden_size)
        positions = _int(student_config, "max_position_embeddings", positions)
    else:
        intermediate = teacher.intermediate_size
    params = transformer_parameters(
        vocab, shape.hidden_size, shape.num_layers, intermediate, positions, 2, num_labels
    )
    return ModelSize(
        params, shape.num_layers, shape.hidden_size, shape.num_heads or 1, intermediate
    )


def layer_activation_bytes(batch_size: int, seq_length: int, size: ModelSize) -> int:
    """Bytes one layer of ``size`` keeps for its backward pass (see the module docstring)."""
    tokens = batch_size * seq_length
    kept = tokens * size.hidden_size * ACTIVATION_BYTES_PER_TOKEN_UNIT
    return kept + batch_size * size.num_heads * seq_length * seq_length * ATTENTION_BYTES_PER_SCORE


def forward_bytes(batch_size: int, seq_length: int, size: ModelSize) -> int:
    """Bytes a no-grad forward pass holds at once: one layer's input, feed-forward and
    attention tensors (two of each alive)."""
    tokens = batch_size * seq_length
    width = size.hidden_size + max(size.intermediate_size, size.hidden_size)
    scores = batch_size * size.num_heads * seq_length * seq_length
    return 2 * FLOAT_BYTES * (tokens * width + scores)


def teacher_output_bytes(batch_size: int, seq_length: int, size: ModelSize) -> int:
    """Bytes of a teacher's no-grad outputs kept for the loss: every hidden state (L + 1) and
    every attention map (L), float32."""
    tokens = batch_size * seq_length
    hidden = (size.num_layers + 1) * tokens * size.hidden_size
    attention = size.num_layers * batch_size * size.num_heads * seq_length * seq_length
    return FLOAT_BYTES * (hidden + attention)


def estimate_training_memory(
    teacher: ModelSize,
    student: ModelSize,
    batch_size: int,
    seq_length: int,
    eval_batch_size: int,
    teacher_forward: bool = True,
) -> MemoryEstimate:
    """Upper estimate of a training job's peak memory (bytes; see the module docstring).

    Args:
        teacher: the teacher's size (its weights are always loaded).
        student: the trained model's size.
        batch_size: B, examples per micro-batch (``training.batch_size``).
        seq_length: T, tokens per example (``training.max_seq_length``).
        eval_batch_size: examples per evaluation batch (no gradients).
        teacher_forward: whether the method runs the teacher on each batch (its outputs are
            then kept for the loss); False for ``finetune`` and the teacher-free methods.

    Returns:
        The estimate: parameters (teacher weights, student weights + gradients + AdamW),
        activations and the runtime allowance.
    """
    train = student.num_layers * layer_activation_bytes(batch_size, seq_length, student)
    train += 2 * FLOAT_BYTES * batch_size * seq_length * student.hidden_size  # embeddings
    evaluate = forward_bytes(eval_batch_size, seq_length, student)
    if teacher_forward:
        train += teacher_output_bytes(batch_size, seq_length, teacher)
        train += forward_bytes(batch_size, seq_length, teacher)
        evaluate = max(evaluate, forward_bytes(eval_batch_size, seq_length, teacher))
    return MemoryEstimate(
        teacher_bytes=FLOAT_BYTES * teacher.parameters,
        student_bytes=TRAINED_BYTES_PER_PARAMETER * student.parameters,
        activation_bytes=max(train, evaluate),
        runtime_bytes=RUNTIME_BYTES,
        teacher=teacher,
        student=student,
    )


def over_budget(estimate: MemoryEstimate, limit_bytes: int, queue: str) -> tuple[str, str] | None:
    """None when ``estimate`` fits ``limit_bytes``; else ``(field, reason)``: the field to
    change (``teacher`` when its weights alone are over, ``student`` when the parameters are
    the larger part, ``training.batch_size`` when the activations are) and a reason giving the
    estimate, its parts and the limit in GiB."""
    if estimate.total_bytes <= limit_bytes:
        return None
    if estimate.teacher_bytes > limit_bytes:
        field, fix = "teacher", "use a smaller teacher or a queue with more memory"
    elif estimate.parameter_bytes >= estimate.activation_bytes:
        field, fix = "student", "choose a smaller student (fewer or narrower layers)"
    else:
        field = "training.batch_size"
        fix = (
            "lower training.batch_size (training.grad_accumulation_steps keeps the effective "
            "batch), training.max_seq_length or training.eval_batch_size"
        )
    reason = (
        f"the job needs an estimated {estimate.total_bytes / GIB:.1f} GiB (parameters "
        f"{estimate.parameter_bytes / GIB:.1f} GiB: teacher {estimate.teacher_bytes / GIB:.1f}, "
        f"student with gradients and AdamW state {estimate.student_bytes / GIB:.1f}; "
        f"activations {estimate.activation_bytes / GIB:.1f} GiB; runtime "
        f"{estimate.runtime_bytes / GIB:.1f} GiB) > limit "
        f"{limit_bytes / GIB:.1f} GiB of queue {queue}; {fix}"
    )
    return field, reason
