"""Randomly initialised VITS models built with Coqui's own API, for the Coqui engine's tests and its GPU
check: no download, a model directory (``model.pth`` and ``config.json``) in a second or so.

The tiny model is a few hundred thousand parameters and uses plain characters (no phonemizer), so it
loads and synthesizes in well under a second on a CPU; its speech is noise, which is all the tests
need. Importing this module does not import torch or Coqui; :func:`build_vits` does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TINY_ARGS: dict[str, Any] = dict(
    hidden_channels=16,
    hidden_channels_ffn_text_encoder=32,
    num_heads_text_encoder=2,
    num_layers_text_encoder=1,
    num_layers_posterior_encoder=1,
    num_layers_flow=1,
    resblock_kernel_sizes_decoder=[3],
    resblock_dilation_sizes_decoder=[[1, 3, 5]],
    upsample_rates_decoder=[8, 8, 4],
    upsample_initial_channel_decoder=16,
    upsample_kernel_sizes_decoder=[16, 16, 8],
    use_sdp=False,
    init_discriminator=False,
)


def build_vits(model_dir: Path, args_kwargs: dict[str, Any], *, multi: bool = False, seed: int = 0) -> Path:
    """Saves a random VITS checkpoint and ``config.json`` into ``model_dir`` and returns it.

    Args:
        model_dir: Where the model goes (created if missing).
        args_kwargs: ``VitsArgs`` fields; :data:`TINY_ARGS` for the tests' model, ``{}`` plus
            ``init_discriminator=False`` for one of the released models' size.
        multi: Two speakers (``alice``, ``bob``) and two languages (``en``, ``fr``).
        seed: Torch's seed for the random weights.
    """
    import torch
    from TTS.tts.configs.vits_config import VitsArgs, VitsConfig
    from TTS.tts.models.vits import Vits

    model_dir.mkdir(parents=True, exist_ok=True)
    args = VitsArgs(**args_kwargs)
    if multi:
        speakers_file = model_dir / "speakers.json"
        speakers_file.write_text(json.dumps({"alice": 0, "bob": 1}))
        languages_file = model_dir / "language_ids.json"
        languages_file.write_text(json.dumps({"en": 0, "fr": 1}))
        args.use_speaker_embedding = True
        args.num_speakers = 2
        args.speakers_file = str(speakers_file)
        args.use_language_embedding = True
        args.embedded_language_dim = 4
        args.language_ids_file = str(languages_file)
    config = VitsConfig(model_args=args, use_phonemes=False, text_cleaner="basic_cleaners")
    torch.manual_seed(seed)
    model = Vits(config)
    torch.save({"model": model.state_dict()}, model_dir / "model.pth")
    config.save_json(str(model_dir / "config.json"))
    return model_dir
