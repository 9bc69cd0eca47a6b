"""Speech synthesised with espeak-ng (a Debian package), for data sets of voices no recording has.

espeak-ng is a formant synthesiser: its voices are unlike any human speaker, so digits it says
test whether an audio model heard the word or learnt the recorded speakers. It writes 22.05 kHz
mono WAV; the project's audio reader resamples it like any file.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Optional

from ..errors import SafeError


def espeak_path() -> Optional[str]:
    return shutil.which("espeak-ng")


def synthesise(text: str, path: Path, voice: str, speed: int, pitch: Optional[int] = None) -> Path:
    """``text`` spoken by espeak-ng ``voice`` (e.g. ``en-gb-scotland+f2``) at ``speed`` words a
    minute, written to ``path`` as WAV."""
    program = espeak_path()
    if program is None:
        raise SafeError("espeak-ng is not installed (apt-get install espeak-ng)")
    command = [program, "-v", voice, "-s", str(speed), "-w", str(path)]
    if pitch is not None:
        command += ["-p", str(pitch)]
    result = subprocess.run(command + [text], capture_output=True, text=True)
    if result.returncode != 0 or not Path(path).is_file():
        raise SafeError(f"espeak-ng could not say {text!r} with voice {voice!r}: {result.stderr.strip()}")
    return Path(path)
