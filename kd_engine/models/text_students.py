"""Cross-architecture students: a BiLSTM and a CNN text classifier on the teacher's tokenizer.

Both read the teacher's token ids (the job tokenises once, with the teacher's tokenizer) and
start from the teacher's word-embedding matrix (``input_ids`` index the same vocabulary). They
are transformers ``PreTrainedModel`` subclasses with their own configs, registered with
``AutoConfig`` and ``AutoModelForSequenceClassification`` when :mod:`kd_engine.models` is
imported: ``save_pretrained`` writes ``config.json`` + ``model.safetensors``, and
``AutoModelForSequenceClassification.from_pretrained(dir)`` loads them back in any process that
has imported ``kd_engine.models`` (plain transformers without kd_engine does not know the two
model types).

- :class:`BiLSTMForSequenceClassification` (model type ``distillery-bilstm``): Tang et al. 2019,
  "Distilling Task-Specific Knowledge from BERT into Simple Neural Networks" (section 3.1): word
  embeddings -> BiLSTM (300 units per direction in the paper) -> the last hidden states of both
  directions concatenated -> a ReLU fully connected layer -> logits. Padding is handled by packing
  the sequences with their real lengths (from the attention mask), so a padded and an unpadded
  copy of a sentence give the same logits; during an ONNX export, which cannot trace packed
  sequences, the same computation runs unpacked (:func:`bidirectional_unpacked`).
- :class:`KimCNNForSequenceClassification` (model type ``distillery-kim-cnn``): Kim 2014,
  "Convolutional Neural Networks for Sentence Classification" (section 2): parallel 1-D
  convolutions of several widths (3, 4, 5 with 100 maps each in the paper) with ReLU over the word
  embeddings, max-over-time pooling, concatenation, dropout (0.5) and a linear layer. Padding
  positions are zeroed before the convolutions and excluded from the max (masked max pooling).

``hidden_states`` (``output_hidden_states=True``) follow transformers' convention, a tuple of
(B, T, d) tensors, embeddings first: for the BiLSTM, the embedding output then each LSTM layer's
output (d = 2 * hidden_size, both directions); for the CNN, the embedding output then the
concatenated feature maps of the convolution block (d = len(kernel_sizes) * num_filters, aligned
on the T token positions: position t is the window centred on token t). Padding positions are
zero in every hidden state. ``attentions`` is always None.
"""

from __future__ import annotations

from typing import Any, cast

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
)
from transformers.modeling_outputs import SequenceClassifierOutput

BILSTM_MODEL_TYPE = "distillery-bilstm"
CNN_MODEL_TYPE = "distillery-kim-cnn"
TEXT_STUDENT_MODEL_TYPES = (BILSTM_MODEL_TYPE, CNN_MODEL_TYPE)


class BiLSTMConfig(PretrainedConfig):
    """Configuration of :class:`BiLSTMForSequenceClassification`.

    Attributes:
        vocab_size: rows of the word-embedding matrix (the teacher's vocabulary).
        embedding_size: E, width of the word embeddings (the teacher's hidden size).
        hidden_size: H, LSTM units per direction (each layer outputs 2H).
        num_hidden_layers: stacked bidirectional LSTM layers.
        dropout: dropout on the embeddings, between LSTM layers and in the classifier.
        classifier_size: width of the ReLU layer of the classifier (None: H).
    """

    model_type = BILSTM_MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 30522,
        embedding_size: int = 384,
        hidden_size: int = 300,
        num_hidden_layers: int = 1,
        dropout: float = 0.1,
        classifier_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.dropout = dropout
        self.classifier_size = classifier_size if classifier_size is not None else hidden_size
        super().__init__(**kwargs)


class KimCNNConfig(PretrainedConfig):
    """Configuration of :class:`KimCNNForSequenceClassification`.

    Attributes:
        vocab_size: rows of the word-embedding matrix (the teacher's vocabulary).
        embedding_size: E, width of the word embeddings (the teacher's hidden size).
        kernel_sizes: widths (in tokens) of the parallel convolutions.
        num_filters: feature maps per width.
        dropout: dropout before the output layer.
    """

    model_type = CNN_MODEL_TYPE

    def __init__(
        self,
        vocab_size: int = 30522,
        embedding_size: int = 384,
        kernel_sizes: list[int] | None = None,
        num_filters: int = 100,
        dropout: float = 0.5,
        **kwargs: Any,
    ) -> None:
        self.vocab_size = vocab_size
        self.embedding_size = embedding_size
        self.kernel_sizes = list(kernel_sizes) if kernel_sizes is not None else [3, 4, 5]
        self.num_filters = num_filters
        self.dropout = dropout
        super().__init__(**kwargs)


def _words(
    embeddings: nn.Embedding, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
) -> torch.Tensor:
    """Word vectors (B, T, E): ``inputs_embeds`` when given (MATE-KD feeds one-hot samples
    times the embedding matrix), else the embeddings of ``input_ids`` (B, T).

    Raises:
        ValueError: neither or both are given.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    return inputs_embeds if inputs_embeds is not None else embeddings(input_ids)


def _mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T) bool mask of real tokens (all True without an attention mask).

    Raises:
        ValueError: the mask's shape differs from the ids'.
    """
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} does not fit input_ids "
            f"{tuple(input_ids.shape)}"
        )
    return attention_mask.bool()


def _classification_loss(
    logits: torch.Tensor, labels: torch.Tensor | None, num_labels: int
) -> torch.Tensor | None:
    """Cross-entropy on class ids (MSE for a single-output regression head), as transformers'
    ``*ForSequenceClassification`` heads compute it; None without labels."""
    if labels is None:
        return None
    if num_labels == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float().view(-1, num_labels), labels.view(-1))


class _TextStudent(PreTrainedModel):
    """What both students share: weight init (PyTorch's defaults) and the output record."""

    main_input_name = "input_ids"
    base_model_prefix = "student"
    embeddings: nn.Embedding

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's own initialisation of each layer (the embeddings are then overwritten by the
        # teacher's word embeddings, see text_student()).
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings

    def set_input_embeddings(self, value: nn.Module) -> None:
        if not isinstance(value, nn.Embedding):
            raise TypeError(f"the word embeddings must be an nn.Embedding, got {type(value)}")
        self.embeddings = value

    @property
    def num_labels(self) -> int:
        """C, the number of outputs."""
        return len(self.config.id2label or {}) or 2

    def _output(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor | None,
        hidden: tuple[torch.Tensor, ...] | None,
        return_dict: bool | None,
    ) -> SequenceClassifierOutput | tuple[torch.Tensor, ...]:
        loss = _classification_loss(logits, labels, self.num_labels)
        out = SequenceClassifierOutput(loss=loss, logits=logits, hidden_states=hidden)
        if return_dict is False:
            return tuple(v for v in out.to_tuple() if v is not None)
        return out


class BiLSTMForSequenceClassification(_TextStudent):
    """BiLSTM text classifier (Tang et al. 2019), see the module docstring."""

    config_class = BiLSTMConfig

    def __init__(self, config: BiLSTMConfig) -> None:
        super().__init__(config)
        h = int(config.hidden_size)
        self.embeddings = nn.Embedding(int(config.vocab_size), int(config.embedding_size))
        self.dropout = nn.Dropout(float(config.dropout))
        # One module per layer (not nn.LSTM(num_layers=...)) so that every layer's output can be
        # reported as a hidden state.
        self.lstm = nn.ModuleList(
            nn.LSTM(
                int(config.embedding_size) if i == 0 else 2 * h,
                h,
                batch_first=True,
                bidirectional=True,
            )
            for i in range(int(config.num_hidden_layers))
        )
        self.fc = nn.Linear(2 * h, int(config.classifier_size))
        self.classifier = nn.Linear(int(config.classifier_size), self.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = False,
        output_attentions: bool | None = False,
        return_dict: bool | None = True,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput | tuple[torch.Tensor, ...]:
        """Logits (B, C) for ``input_ids`` (B, T) with right padding marked by
        ``attention_mask`` (B, T) (1 = real token). ``token_type_ids`` are ignored (a sentence
        pair is read as one sequence, [CLS] a [SEP] b [SEP]).

        Raises:
            ValueError: the attention mask does not fit the ids.
        """
        words = _words(self.embeddings, input_ids, inputs_embeds)
        mask = _mask(words[..., 0], attention_mask)
        keep = mask.unsqueeze(-1).to(self.embeddings.weight.dtype)
        x = self.dropout(words) * keep
        hidden: list[torch.Tensor] = [x]
        lengths = mask.sum(dim=1).clamp(min=1)  # real lengths (>= 1)
        total = words.shape[1]
        exporting = torch.onnx.is_in_onnx_export()
        last = torch.empty(0)
        for i, lstm in enumerate(self.lstm):
            if i > 0:
                x = self.dropout(x)
            if exporting:  # ONNX's exporter cannot trace packed sequences
                x, last = bidirectional_unpacked(cast(nn.LSTM, lstm), x, lengths)
            else:
                # Lengths on the CPU, as pack_padded_sequence wants them.
                packed = nn.utils.rnn.pack_padded_sequence(
                    x, lengths.cpu(), batch_first=True, enforce_sorted=False
                )
                out, (h_n, _) = lstm(packed)
                x, _ = nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=total)
                # h_n: (2, B, H), the forward state after the last real token and the backward
                # state after the first token (batch order restored by the packed sequence).
                last = torch.cat([h_n[0], h_n[1]], dim=-1)
            hidden.append(x)
        features = self.dropout(F.relu(self.fc(self.dropout(last))))
        logits = self.classifier(features)
        return self._output(
            logits, labels, tuple(hidden) if output_hidden_states else None, return_dict
        )


def roll_rows(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """``x`` (B, T, d) with row b rotated right by ``shifts[b]`` steps (0..T), as
    ``torch.roll`` per row: out[b, t] = x[b, (t - shifts[b]) mod T]."""
    steps = torch.arange(x.shape[1], device=x.device).unsqueeze(0)  # (1, T)
    index = torch.remainder(steps - shifts.unsqueeze(1), x.shape[1])  # (B, T)
    return x.gather(1, index.unsqueeze(-1).expand(-1, -1, x.shape[2]))


def bidirectional_unpacked(
    lstm: nn.LSTM, x: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One bidirectional, batch-first ``lstm`` layer over right-padded ``x`` (B, T, d_in)
    without packed sequences (which ONNX's exporter cannot trace), equal to the packed
    computation of :class:`BiLSTMForSequenceClassification`. The layer runs twice: on ``x``
    as it is, where its forward direction is right (the padding comes after every real step),
    and on ``x`` with each row rotated to end at its last real token (left padding,
    :func:`roll_rows`), where its backward direction is right (it starts at the last real
    token and reaches the first before any padding); the backward outputs are rotated back.

    Args:
        lstm: ``nn.LSTM(d_in, H, batch_first=True, bidirectional=True)``, one layer.
        x: (B, T, d_in) inputs, right padded with zeros.
        lengths: (B,) int64 real lengths, 1..T.

    Returns:
        ``(outputs, last)``: (B, T, 2H) outputs of both directions, zero at padding positions
        (as ``pad_packed_sequence`` gives them), and (B, 2H) the forward state after the last
        real token and the backward state after the first token, concatenated (``h_n``).
    """
    hidden, total = lstm.hidden_size, x.shape[1]
    shift = total - lengths  # (B,) left padding of each row
    out_right, _ = lstm(x)
    out_left, _ = lstm(roll_rows(x, shift))
    forward = out_right[..., :hidden]
    backward = roll_rows(out_left[..., hidden:], lengths)  # rotated back: total - shift
    at_last = (lengths - 1).view(-1, 1, 1).expand(-1, 1, hidden)
    at_first = shift.view(-1, 1, 1).expand(-1, 1, hidden)
    last = torch.cat(
        [forward.gather(1, at_last), out_left[..., hidden:].gather(1, at_first)], dim=-1
    ).squeeze(1)
    steps = torch.arange(total, device=x.device).unsqueeze(0)
    real = (steps < lengths.unsqueeze(1)).unsqueeze(-1).to(out_right.dtype)  # (B, T, 1)
    return torch.cat([forward, backward], dim=-1) * real, last


class KimCNNForSequenceClassification(_TextStudent):
    """CNN text classifier (Kim 2014), see the module docstring."""

    config_class = KimCNNConfig

    def __init__(self, config: KimCNNConfig) -> None:
        super().__init__(config)
        e, f = int(config.embedding_size), int(config.num_filters)
        self.embeddings = nn.Embedding(int(config.vocab_size), e)
        self.kernel_sizes = [int(k) for k in config.kernel_sizes]
        self.convs = nn.ModuleList(nn.Conv1d(e, f, k) for k in self.kernel_sizes)
        self.dropout = nn.Dropout(float(config.dropout))
        self.classifier = nn.Linear(len(config.kernel_sizes) * f, self.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = False,
        output_attentions: bool | None = False,
        return_dict: bool | None = True,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> SequenceClassifierOutput | tuple[torch.Tensor, ...]:
        """Logits (B, C) for ``input_ids`` (B, T) with padding marked by ``attention_mask``
        (B, T) (1 = real token). ``token_type_ids`` are ignored.

        Raises:
            ValueError: the attention mask does not fit the ids.
        """
        words = _words(self.embeddings, input_ids, inputs_embeds)
        mask = _mask(words[..., 0], attention_mask)
        keep = mask.unsqueeze(-1)
        emb = words * keep.to(self.embeddings.weight.dtype)
        x = emb.transpose(1, 2)  # (B, E, T)
        # Zero vectors beyond both ends ((k - 1) // 2 before, k // 2 after, as Kim's code pads
        # sentences with zero vectors) keep one output per token position: the maps align on T.
        maps = torch.cat(
            [
                F.relu(conv(F.pad(x, ((k - 1) // 2, k // 2))))
                for k, conv in zip(self.kernel_sizes, self.convs, strict=True)
            ],
            dim=1,
        ).transpose(1, 2)
        # Masked max over time: padding positions never win (every row has a real token).
        pooled = maps.masked_fill(~keep, float("-inf")).amax(dim=1)
        logits = self.classifier(self.dropout(pooled))
        hidden = (emb, maps.masked_fill(~keep, 0.0)) if output_hidden_states else None
        return self._output(logits, labels, hidden, return_dict)


def _register() -> None:
    for model_type, config_cls, model_cls in (
        (BILSTM_MODEL_TYPE, BiLSTMConfig, BiLSTMForSequenceClassification),
        (CNN_MODEL_TYPE, KimCNNConfig, KimCNNForSequenceClassification),
    ):
        AutoConfig.register(model_type, config_cls, exist_ok=True)
        AutoModelForSequenceClassification.register(config_cls, model_cls, exist_ok=True)


_register()


def _label_maps(label_names: list[str]) -> dict[str, Any]:
    """Config entries of the output layer; one label name is a regression model (MSE)."""
    return {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {n: i for i, n in enumerate(label_names)},
        "problem_type": "regression" if len(label_names) == 1 else None,
    }


def bilstm_student(
    word_embeddings: torch.Tensor,
    label_names: list[str],
    hidden_size: int = 300,
    num_layers: int = 1,
    dropout: float = 0.1,
    pad_token_id: int = 0,
) -> BiLSTMForSequenceClassification:
    """A BiLSTM classifier whose word embeddings start as a copy of ``word_embeddings``.

    Args:
        word_embeddings: the teacher's word-embedding matrix (V, E); copied, not shared.
        label_names: class names, in class-id order (one name: a regression model).
        hidden_size, num_layers, dropout: see :class:`BiLSTMConfig`.
        pad_token_id: the tokenizer's padding id (recorded in the config).
    """
    vocab, width = word_embeddings.shape
    config = BiLSTMConfig(
        vocab_size=int(vocab),
        embedding_size=int(width),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        dropout=dropout,
        pad_token_id=pad_token_id,
        **_label_maps(label_names),
    )
    model = BiLSTMForSequenceClassification(config)
    with torch.no_grad():
        model.embeddings.weight.copy_(word_embeddings.detach().float())
    return model


def cnn_student(
    word_embeddings: torch.Tensor,
    label_names: list[str],
    kernel_sizes: list[int] | None = None,
    num_filters: int = 100,
    dropout: float = 0.5,
    pad_token_id: int = 0,
) -> KimCNNForSequenceClassification:
    """A Kim CNN classifier whose word embeddings start as a copy of ``word_embeddings``.

    Args:
        word_embeddings: the teacher's word-embedding matrix (V, E); copied, not shared.
        label_names: class names, in class-id order (one name: a regression model).
        kernel_sizes, num_filters, dropout: see :class:`KimCNNConfig`.
        pad_token_id: the tokenizer's padding id (recorded in the config).
    """
    vocab, width = word_embeddings.shape
    config = KimCNNConfig(
        vocab_size=int(vocab),
        embedding_size=int(width),
        kernel_sizes=kernel_sizes,
        num_filters=num_filters,
        dropout=dropout,
        pad_token_id=pad_token_id,
        **_label_maps(label_names),
    )
    model = KimCNNForSequenceClassification(config)
    with torch.no_grad():
        model.embeddings.weight.copy_(word_embeddings.detach().float())
    return model
