"""Teacher loading, student builders.

Importing this package registers the BiLSTM and CNN students (model types ``distillery-bilstm``
and ``distillery-kim-cnn``) with transformers' ``AutoConfig`` and
``AutoModelForSequenceClassification``, see :mod:`kd_engine.models.text_students`.
"""

from kd_engine.models import text_students

__all__ = ["text_students"]
