"""Media of multimodal rows: OpenAI-style content parts, where their bytes come from, and how they
are stored between stages.

A part's media is kept in the ``multimodal_data`` column as one item per part, in the order of the
parts: ``{modality, uri, mime_type, sha256, data}``. Media that arrived inline (a data URL, base64
audio, a PIL image) keep their encoded bytes in ``data``; media named by an http(s) URL or a local
path keep only the reference (``uri``) and the digest of the bytes the PrepareMultimodal stage read:
the engine reads them again and refuses bytes that changed. Nothing is pickled, and a large file
named by URL is never copied into Parquet.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import mimetypes
import os
import urllib.error
import urllib.parse
import urllib.request
from typing import Any, Optional

import pyarrow as pa

# Content part type -> (modality, the field holding its URL). input_audio holds base64 data itself.
PART_TYPES = {
    "image_url": ("image", "image_url"),
    "video_url": ("video", "video_url"),
    "audio_url": ("audio", "audio_url"),
    "input_audio": ("audio", "input_audio"),
}
# image_pil is turned into an image_url data URL by Preprocess (PNG bytes, never a pickled object).
ALL_PART_TYPES = ("text", "image_pil", *PART_TYPES)
DEFAULT_MIME = {"image": "image/png", "audio": "audio/wav", "video": "video/mp4"}
FETCH_TIMEOUT_S = float(os.environ.get("LLM_ASSETS_MEDIA_FETCH_TIMEOUT_S", "30"))

ITEM_TYPE = pa.struct(
    [
        ("modality", pa.string()),
        ("uri", pa.string()),
        ("mime_type", pa.string()),
        ("sha256", pa.string()),
        ("data", pa.binary()),
    ]
)
COLUMN = "multimodal_data"
COLUMN_TYPE = pa.list_(ITEM_TYPE)


class MediaError(ValueError):
    """Media that cannot be read: the message says what and where (the caller names the row)."""


def part_reference(part: dict[str, Any]) -> tuple[str, str]:
    """``(modality, url)`` of a media part; ``input_audio``'s base64 data becomes a data URL."""
    kind = part.get("type")
    modality, field = PART_TYPES[kind]
    value = part.get(field)
    if kind == "input_audio":
        if not isinstance(value, dict) or not isinstance(value.get("data"), str):
            raise MediaError("expected {'data': '<base64>', 'format': 'wav'}")
        return modality, f"data:audio/{value.get('format') or 'wav'};base64,{value['data']}"
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url:
        raise MediaError(f"expected {{'url': '...'}} (an http(s) URL, a data URL or a local path), got {value!r:.60}")
    return modality, url


def read_item(modality: str, url: str) -> tuple[dict[str, Any], bytes]:
    """Read a part's bytes: the item to store (bytes kept only for inline media), and the bytes."""
    if url[:5].lower() == "data:":
        mime, data = _data_url(url)
        return _item(modality, None, mime or DEFAULT_MIME[modality], data, keep=True), data
    data = read_reference(url)
    return _item(modality, url, _guess_mime(modality, url), data, keep=False), data


def item_bytes(item: dict[str, Any]) -> bytes:
    """A stored item's bytes: inline, or read again from its reference (checked against its digest)."""
    if item.get("data") is not None:
        return item["data"]
    data = read_reference(item["uri"])
    if hashlib.sha256(data).hexdigest() != item["sha256"]:
        raise MediaError(
            f"{item['uri']} changed since the prepare_multimodal stage read it (its bytes differ): rerun that stage"
        )
    return data


def data_url(mime_type: str, data: bytes) -> str:
    return f"data:{mime_type};base64,{base64.b64encode(data).decode('ascii')}"


def pil_data_url(image: Any) -> str:
    """A PIL image as a PNG data URL (lossless, and readable by any decoder)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return data_url("image/png", buffer.getvalue())


def read_reference(url: str) -> bytes:
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme in ("http", "https"):
        try:
            with urllib.request.urlopen(url, timeout=FETCH_TIMEOUT_S) as response:
                return response.read()
        except urllib.error.HTTPError as exc:
            raise MediaError(f"GET {url} answered HTTP {exc.code} {exc.reason}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise MediaError(f"GET {url} failed: {getattr(exc, 'reason', exc)}") from None
    if scheme == "file":
        path = urllib.request.url2pathname(urllib.parse.urlsplit(url).path)
    elif scheme == "":
        path = url
    else:
        raise MediaError(f"{url!r:.80}: expected an http(s) URL, a data URL, a file:// URL or a local path")
    try:
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise MediaError(f"cannot read {path}: {exc.strerror}") from None


def _item(modality: str, uri: Optional[str], mime: str, data: bytes, keep: bool) -> dict[str, Any]:
    if not data:
        raise MediaError(f"{uri or 'the data URL'} is empty")
    return {
        "modality": modality,
        "uri": uri,
        "mime_type": mime,
        "sha256": hashlib.sha256(data).hexdigest(),
        "data": data if keep else None,
    }


def _data_url(url: str) -> tuple[str, bytes]:
    spec, sep, payload = url[5:].partition(",")
    if not sep or not spec.endswith(";base64"):
        raise MediaError(f"{url[:40]!r}...: expected a base64 data URL, data:<type>;base64,<data>")
    try:
        return spec[: -len(";base64")].partition(";")[0], base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MediaError(f"the data URL's base64 does not decode: {exc}") from None


def _guess_mime(modality: str, url: str) -> str:
    guessed = mimetypes.guess_type(urllib.parse.urlsplit(url).path)[0]
    return guessed if guessed and guessed.startswith(modality + "/") else DEFAULT_MIME[modality]


def decode(modality: str, mime_type: str, data: bytes, media_io_kwargs: Optional[dict[str, Any]] = None) -> Any:
    """Decode with vLLM's own media loaders (what the engine will do): a PIL image, (samples,
    sample rate) audio, or video frames with their metadata. Bytes that do not decode: MediaError."""
    from vllm.multimodal.utils import MediaConnector

    connector = MediaConnector(media_io_kwargs=media_io_kwargs)
    fetch = {"image": connector.fetch_image, "audio": connector.fetch_audio, "video": connector.fetch_video}[modality]
    try:
        return fetch(data_url(mime_type, data))
    except Exception as exc:  # vLLM's loaders raise whatever their backend raises (PIL, soundfile, OpenCV)
        raise MediaError(
            f"the {modality} ({mime_type}, {len(data)} bytes) does not decode: {type(exc).__name__}: {exc}"
        ) from None


def parse_chat_messages(messages: list[dict[str, Any]], model_config: Any, content_format: str):
    """vLLM's own parsing of OpenAI chat messages (what its server runs): the conversation with the
    model's media placeholders, and the decoded media as ``multi_modal_data``."""
    try:  # vLLM >= 0.30 moved it from the OpenAI server's package to the renderers
        from vllm.renderers.chat_utils import parse_chat_messages as parse
    except ImportError:
        from vllm.entrypoints.chat_utils import parse_chat_messages as parse
    conversation, mm_data, _uuids = parse(messages, model_config, content_format=content_format)
    return conversation, mm_data
