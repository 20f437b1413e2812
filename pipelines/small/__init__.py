"""The small shapes models: procedural dataset, small pipelines on real diffusers architectures, training,
evaluation and the shape/colour classifier, shipped in ``models/`` beside this file.

* :mod:`.pipeline` — ``SmallFluxPipeline``, ``SmallUNetPipeline``, ``SmallWanPipeline``, :func:`load_small`
  (re-exported here);
* :mod:`.shapes` — the shapes dataset (images and clips with captions);
* :mod:`.train` — ``diffaccel train-small`` (flow matching on the dataset);
* :mod:`.evaluate` — ``diffaccel eval`` (every method against full attention) and the classifier.

They exist so every method can be run, trained and measured offline on CPU; the high-resolution pipelines of
:mod:`diffaccel.pipelines` work on them as on any diffusers pipeline.
"""
from .pipeline import (DEFAULT_CONFIGS, MODELS_DIR, SMALL_MODELS, SmallFluxPipeline, SmallUNetPipeline,
                       SmallVideoOutput, SmallWanPipeline, build_pipeline, build_text_encoder, build_tokenizer,
                       is_patch_size, load_small, repatch_wan, resolve_small)

__all__ = ["DEFAULT_CONFIGS", "MODELS_DIR", "SMALL_MODELS", "SmallFluxPipeline", "SmallUNetPipeline",
           "SmallVideoOutput", "SmallWanPipeline", "build_pipeline", "build_text_encoder", "build_tokenizer",
           "is_patch_size", "load_small", "repatch_wan", "resolve_small"]
