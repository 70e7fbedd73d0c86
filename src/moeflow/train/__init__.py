"""Training: run configs and presets, the embedded corpus and batch streams, checkpoints, and the loop."""

from moeflow.train.checkpoint import CheckpointError, atomic_torch_save, load_checkpoint, save_checkpoint
from moeflow.train.config import (RUN_PRESETS, RunConfig, TrainConfig, apply_overrides, config_keys,
                                  dense_counterpart, get_preset, load_config_file, parse_set)
from moeflow.train.data import BatchStream, Corpus, DataConfig, DataError, decode, encode, load_corpus
from moeflow.train.lm import LMTask, lm_trainer, model_from_run
from moeflow.train.task import Task, TrainSchedule
from moeflow.train.trainer import LocalHooks, ParallelHooks, Trainer, TrainingDiverged, TrainResult

__all__ = ["CheckpointError", "atomic_torch_save", "load_checkpoint", "save_checkpoint", "RUN_PRESETS", "RunConfig",
           "TrainConfig", "apply_overrides", "config_keys", "dense_counterpart", "get_preset", "load_config_file",
           "parse_set", "BatchStream", "Corpus", "DataConfig", "DataError", "decode", "encode", "load_corpus",
           "LocalHooks", "ParallelHooks", "Trainer", "TrainingDiverged", "TrainResult", "model_from_run",
           "LMTask", "lm_trainer", "Task", "TrainSchedule"]
