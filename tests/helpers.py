"""Small data made by the tests: tiny VGG-shaped weights and images with real structure."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline import synthetic
from pipeline.model import VGG16_BLOCKS, ConvLayer, build_feature_graph, save_model

TINY_WIDTHS = (8, 16, 32, 64, 64)  # output channels per block (VGG16: 64, 128, 256, 512, 512)
TINY_SIZE = 32


def tiny_layers(seed: int = 0, widths: tuple[int, ...] = TINY_WIDTHS) -> list[ConvLayer]:
    """VGG16-shaped conv layers (13 convs in 5 blocks) with He-initialised random weights."""
    rng = np.random.default_rng(seed)
    layers, in_ch = [], 3
    for b, (n, width) in enumerate(zip(VGG16_BLOCKS, widths, strict=True)):
        for c in range(n):
            std = np.sqrt(2.0 / (in_ch * 9))
            if b == 0 and c == 0:
                std /= 128.0  # raw pixels minus the mean are in the +-128 range
            kernel = rng.normal(0, std, (width, in_ch, 3, 3)).astype(np.float32)
            bias = rng.normal(0, 0.01, width).astype(np.float32)
            layers.append((f"block{b + 1}_conv{c + 1}", kernel, bias))
            in_ch = width
    return layers


def write_tiny_model(path: Path, seed: int = 0, name: str = "tiny-vgg") -> Path:
    model, _ = build_feature_graph(tiny_layers(seed), name=name, input_size=TINY_SIZE)
    save_model(model, path)
    return path


def pattern(seed: int, size: tuple[int, int] = (96, 72)) -> np.ndarray:
    """A smooth random picture around a random colour (uint8 RGB, H x W).

    Distinct per seed and it survives crops and rescales, so even a random-weight tiny model
    retrieves it (checked: 40 of 40 centre crops find their original with tiny_layers(0)).
    """
    rng = np.random.default_rng(seed)
    colour = rng.integers(0, 256, 3)
    coarse = np.clip(colour + rng.normal(0, 50, (4, 4, 3)), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC))


def png_bytes(seed: int, size: tuple[int, int] = (96, 72)) -> bytes:
    """pattern(seed) as PNG bytes: an upload, or an addition, distinct per seed."""
    import io

    buf = io.BytesIO()
    Image.fromarray(pattern(seed, size)).save(buf, format="PNG")
    return buf.getvalue()


def save_pattern(path: Path, seed: int, size: tuple[int, int] = (96, 72), **save_args) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pattern(seed, size)).save(path, **save_args)
    return path


def centre_crop(src: Path, dst: Path, frac: float = 0.8) -> Path:
    with Image.open(src) as im:
        w, h = im.size
        dw, dh = round(w * (1 - frac) / 2), round(h * (1 - frac) / 2)
        im.crop((dw, dh, w - dw, h - dh)).save(dst)
    return dst


def write_bad_corpus(root: Path) -> tuple[dict[str, str], dict[str, str]]:
    """Every kind of awkward input. Returns (decodable name -> note, undecodable name -> reason word)."""
    import os

    from PIL import ImageDraw

    root.mkdir(parents=True, exist_ok=True)
    good: dict[str, str] = {}
    bad: dict[str, str] = {}
    base = Image.fromarray(pattern(100, (80, 60)))

    (root / "zero.jpg").write_bytes(b"")
    bad["zero.jpg"] = "empty"
    base.save(root / "full.jpg", quality=90)
    data = (root / "full.jpg").read_bytes()
    (root / "full.jpg").unlink()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    bad["truncated.jpg"] = "truncated"
    (root / "text.jpg").write_text("this is not an image\n")
    bad["text.jpg"] = "not an image"

    rgba = base.convert("RGBA")
    rgba.putalpha(Image.new("L", base.size, 0))
    rgba.save(root / "alpha.png")
    good["alpha.png"] = "fully transparent: composited on white"
    base.convert("P", palette=Image.Palette.ADAPTIVE).save(root / "palette.gif")
    good["palette.gif"] = "palette"
    frames = [Image.fromarray(pattern(s, (40, 30))).convert("P") for s in (101, 102)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    good["animated.gif"] = "animated: first frame"
    base.convert("CMYK").save(root / "cmyk.jpg")
    good["cmyk.jpg"] = "CMYK"
    Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16)).save(root / "gray16.png")
    good["gray16.png"] = "16-bit"
    Image.new("RGB", (1, 1), (200, 10, 10)).save(root / "one_pixel.png")
    good["one_pixel.png"] = "1x1"
    Image.new("1", (9500, 9500)).save(root / "bomb.png")  # 90.25M pixels > Pillow's 89.5M limit
    bad["bomb.png"] = "too large"
    rotated = Image.new("RGB", (64, 32), (0, 0, 255))
    ImageDraw.Draw(rotated).rectangle((0, 0, 31, 31), fill=(255, 0, 0))  # left half red, right blue
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    rotated.save(root / "exif_rotated.jpg", exif=exif, quality=95)
    good["exif_rotated.jpg"] = "EXIF orientation 6"
    base.save(root / "猫 photo ü.jpg")
    good["猫 photo ü.jpg"] = "unicode and spaces"
    base.save(root / "UPPER.JPG")
    good["UPPER.JPG"] = "upper-case extension"
    os.symlink(root / "does-not-exist.jpg", root / "broken_link.jpg")
    bad["broken_link.jpg"] = "broken symbolic link"
    Image.fromarray(pattern(103)).save(root / "locked.png")
    os.chmod(root / "locked.png", 0)
    if os.geteuid() == 0:  # root reads anything: the file is then simply a good image
        good["locked.png"] = "unreadable for others; root can read it"
    else:
        bad["locked.png"] = "permission denied"
    (root / "notes.txt").write_text("ignored: not an image extension")
    return good, bad


def clustered_vectors(n: int, dim: int = 64, clusters: int = 20, seed: int = 0) -> np.ndarray:
    """Seeded unit vectors around random centres: structured like real features, unlike uniform noise
    (pipeline.synthetic's generator, the benchmarks' too: here around `clusters` normal centres, with
    noise half a centre's norm)."""
    rng = np.random.default_rng(seed)
    return synthetic.clustered(n, rng.normal(size=(clusters, dim)), rng, spread=0.5 * np.sqrt(dim))


def write_synthetic_shards(
    features_dir: Path,
    vectors: np.ndarray,
    shard_size: int,
    model_sha: str = "f" * 64,
    first: int = 0,
    pooling: str | None = None,
) -> list[str]:
    """Real shard files holding `vectors`, with made-up paths /synthetic/NNNNNNN.jpg numbered from
    `first`, after the shards already in the folder; `pooling`: the recipe's (a POOLINGS value)."""
    info = synthetic.model_info(vectors.shape[1], model_sha, TINY_SIZE, pooling)
    return synthetic.write_shards(features_dir, vectors, info, shard_size, first=first)


def misbehaving_decode(path: str, settings, use_alarm: bool):
    """A decode function for DecodePool tests: files named *crash* kill the worker, *hang* never return."""
    import os
    import time

    from pipeline.decode_pool import decode_one

    name = Path(path).name
    if "crash" in name:
        os._exit(13)
    if "hang" in name:
        time.sleep(3600)
    return decode_one(path, settings, use_alarm)


def obey_file_modes() -> None:
    """preexec_fn for a subprocess that must obey permission bits even when the tests run as root
    (as in CI): it drops CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the capability bounding set,
    so the program it then executes has neither, and a folder of mode 000 cannot be listed by it."""
    import ctypes
    import os

    if os.geteuid() != 0:
        return  # an ordinary user obeys them already
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH (linux/capability.h)
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


@contextmanager
def live_server(app) -> Iterator[str]:
    """Run an ASGI app under uvicorn in a thread on 127.0.0.1 (a free port); yields its base URL."""
    import threading

    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: server.started or not thread.is_alive(), "the server to start")
        assert server.started, "uvicorn did not start (see the log)"
        yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()


def wait_for(condition, what: str, limit: float = 60.0) -> None:
    """Wait until `condition()` holds (polling); the limit only stops a broken test from hanging."""
    import time

    deadline = time.monotonic() + limit
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.01)


def textured_picture(seed: int, size: tuple[int, int] = (480, 360)) -> Image.Image:
    """A textured synthetic picture: the same palette and style for every seed, different shapes and places."""
    rng = np.random.default_rng(seed)
    palette = [(200, 60, 40), (40, 120, 200), (240, 200, 60), (30, 30, 30), (250, 250, 250)]
    im = Image.new("RGB", size, (90, 140, 110))
    draw = ImageDraw.Draw(im)
    w, h = size
    for _ in range(70):
        x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.integers(6, 40))
        colour = palette[int(rng.integers(0, len(palette)))]
        if rng.random() < 0.5:
            draw.ellipse((x - r, y - r, x + r, y + r), fill=colour, outline=(0, 0, 0))
        else:
            draw.rectangle((x - r, y - r // 2, x + r, y + r // 2), fill=colour, outline=(0, 0, 0))
    return im


@contextmanager
def serve_child(index_dir: Path, model: Path, *options: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`pipeline serve` in a child process on a free port, once it answers health; killed at the end."""
    import httpx  # (the serve extra's client: only tests of the service call this)

    with socket.socket() as s:  # a free port for the child
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    child = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "serve", "--index", str(index_dir), "--model", str(model)]
        + ["--port", str(port), "--no-warm", *options],
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def up() -> bool:
            assert child.poll() is None, child.stderr.read() if child.stderr else "the service exited"
            try:
                return httpx.get(f"{url}/api/health").status_code == 200
            except httpx.TransportError:
                return False

        wait_for(up, "the service to start")
        yield child, url
    finally:
        child.kill()
        child.wait()


_STOP_AT = """
import sys, time
from pipeline import cli

stop_label, stop_count, marker, seen = sys.argv[1], int(sys.argv[2]), sys.argv[3], []

def counted(owner, name, label):
    real = getattr(owner, name)

    def step(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append(label)
        if label == stop_label and seen.count(label) == stop_count:  # stand still right after it until killed
            open(marker, "w").close()
            time.sleep(3600)
        return result

    setattr(owner, name, step)

for owner, name, label in STEPS:
    counted(owner, name, label)
cli.app(sys.argv[4:], prog_name="pipeline")
"""


def stopping_program(steps: str) -> str:
    """A `python -c` program: `pipeline ARGS` (argv 4 on) that stands still, once it has written the file MARKER
    (argv 3), right after the COUNT-th (argv 2) call of the step LABEL (argv 1), until it is killed. `steps`: code
    that imports the steps' owners and sets STEPS = [(owner, attribute, label), ...]."""
    return steps + _STOP_AT


def kill_at_step(program: str, label: str, count: int, marker: Path, args: list[str]) -> None:
    """Run `program` (stopping_program) with `pipeline ARGS`, wait for it to stand still right after the count-th
    `label` (a state, never a clock), and SIGKILL it there; AssertionError when the run ended before that step."""
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", program, label, str(count), str(marker), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    while not marker.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"the run ended before {label} #{count}: {err.decode()[-500:]}"
