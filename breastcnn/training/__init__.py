"""Training: the NumPy loop, the Keras fine-tuning and what they share.

- :mod:`~breastcnn.training.config`: :class:`TrainConfig`, every option of ``breastcnn train`` and its default.
- :mod:`~breastcnn.training.recipes`: named recipes and the run's :class:`TrainingSchedule` (LR, stopping, best).
- :mod:`~breastcnn.training.common`: the run vocabulary both loops use (file names, :class:`TrainingDiverged`,
  :func:`validation_scores`).
- :mod:`~breastcnn.training.state`: :class:`TrainState` (the resumable state, JSON round trip) and ``last.npz``.
- :mod:`~breastcnn.training.callbacks`: progress hooks and the loop's own callbacks (history, schedule,
  best model, checkpoint).
- :mod:`~breastcnn.training.data`: the images a run trains and validates on.
- :mod:`~breastcnn.training.loop`: the NumPy loop (``fit``).
- :mod:`~breastcnn.training.numpy_run`: ``breastcnn train`` / NumPy ``finetune`` as library calls.
- :mod:`~breastcnn.training.keras_loop`: the Keras fine-tuning (imports TensorFlow only when it runs).
"""
