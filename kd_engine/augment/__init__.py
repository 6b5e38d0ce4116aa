"""Augmentation for KD: masking, a masked-LM generator and its straight-through samples fed
through each model's own embedding path (MATE-KD and its family), and the memory estimate that
lets such a job fail early. No method logic lives here (see :mod:`kd_engine.methods`)."""
