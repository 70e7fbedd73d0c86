"""Embedded tasks that need no download: multilingual translation between synthetic languages."""

from moeflow.tasks.languages import LANGUAGES, Language, get_languages
from moeflow.tasks.translate import (TRANSLATE_PRESETS, CharVocab, TranslateConfig, TranslateData, apply_overrides,
                                     evaluate, translate, translate_preset)
from moeflow.tasks.translate_train import collect_language_routing, load_run, train_translate

__all__ = ["LANGUAGES", "Language", "get_languages", "TRANSLATE_PRESETS", "CharVocab", "TranslateConfig",
           "TranslateData", "apply_overrides", "evaluate", "translate", "translate_preset",
           "collect_language_routing", "load_run", "train_translate"]
