"""
C{txgraph-admin make-thin}: store a local image's layers once in the pool
as shared layers, and load into dockerd a thin image whose only layer is a
descriptor of them (L{txgraph.thin}), with the original config.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import sys
import tarfile
import tempfile
import time
from typing import Any

from txgraph import thin
from txgraph.admin.client import Daemon, offline
from txgraph.admin.progress import Progress
from txgraph.admin.tasks import publish_layers, thin_info
from txgraph.engine import Engine
from txgraph.errors import TxgraphError

_SAVED = re.compile(r"^(?:[0-9a-f]{64}\.json|manifest\.json|[0-9a-f]{64}/layer\.tar)$")


def save_image(engine: Engine, ref: str, directory: str, layers: bool) -> dict[str, Any]:
    """
    C{docker save REF} into C{directory}: its manifest and config, and (if
    C{layers}) every C{layer.tar}.  Returns the manifest entry, with
    C{config} (the raw config JSON), C{paths} (layer tar paths, in order)
    and C{sizes} (their sizes) added.
    """
    links: dict[str, str] = {}
    sizes: dict[str, int] = {}
    with engine.save(ref) as response, tarfile.open(fileobj=response, mode="r|") as tar:
        for member in tar:
            if not _SAVED.match(member.name):
                continue
            if member.isfile():
                sizes[member.name] = member.size
            if member.name.endswith("layer.tar") and not layers:
                continue
            target = os.path.join(directory, member.name)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            if member.issym():
                links[member.name] = os.path.normpath(
                    os.path.join(os.path.dirname(member.name), member.linkname)
                )
                continue
            if not member.isfile():
                continue
            source = tar.extractfile(member)
            assert source is not None
            with open(target, "xb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
    try:
        with open(os.path.join(directory, "manifest.json")) as f:
            manifest = json.load(f)
        entry = manifest[0]
        with open(os.path.join(directory, entry["Config"])) as f:
            config = json.load(f)
    except (OSError, ValueError, LookupError, TypeError) as e:
        raise TxgraphError(f"docker save {ref} gave no usable manifest and config: {e}") from None
    paths = []
    layer_sizes = []
    for name in entry.get("Layers", []):
        name = links.get(name, name)
        if not _SAVED.match(name) or name not in sizes:
            raise TxgraphError(f"docker save {ref}: unexpected layer path {name!r}")
        paths.append(os.path.join(directory, name))
        layer_sizes.append(sizes[name])
    return {**entry, "config": config, "paths": paths, "sizes": layer_sizes}


def thin_tar(config: dict[str, Any], descriptor: bytes, ref: str, origin: str) -> tuple[bytes, str]:
    """
    A C{docker load} archive of the thin image: the original config with
    one layer (the descriptor's) and a history saying so.  Returns the
    archive and the thin image's ID.
    """
    layer = thin.layer_tar(descriptor)
    layer_digest = hashlib.sha256(layer).hexdigest()
    new = dict(config)
    new["rootfs"] = {"type": "layers", "diff_ids": [f"sha256:{layer_digest}"]}
    history = [
        {**h, "empty_layer": True} for h in config.get("history", []) if isinstance(h, dict)
    ]
    history.append(
        {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "created_by": f"txgraph-admin make-thin {origin}",
            "comment": f"txgraph thin image: the layers are shared RBD snapshots ({thin.DESCRIPTOR_PATH})",
        }
    )
    new["history"] = history
    raw_config = json.dumps(new, separators=(",", ":")).encode()
    config_digest = hashlib.sha256(raw_config).hexdigest()
    manifest = [
        {"Config": f"{config_digest}.json", "RepoTags": [ref], "Layers": [f"{layer_digest}/layer.tar"]}
    ]
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (
            (f"{config_digest}.json", raw_config),
            (f"{layer_digest}/layer.tar", layer),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue(), f"sha256:{config_digest}"


def thin_ref(image: dict[str, Any], given: str) -> str:
    tags = image.get("RepoTags") or []
    source = tags[0] if tags else ""
    if not source or "@" in source:
        raise TxgraphError(f"image {given!r} has no tag to derive the thin image's name from; give --tag")
    repo, _, tag = source.rpartition(":")
    if "/" in tag or not repo:
        repo, tag = source, "latest"
    return f"{repo}:{tag}-thin"


def cmd_make_thin(args: argparse.Namespace) -> int:
    """
    Make a thin image of a local image: its layers go to the pool once (as
    shared snapshots), dockerd gets an image whose only layer describes them.
    """
    engine = Engine(args.docker_host)
    image = engine.inspect_image(args.image)
    diff_ids = list(image.get("RootFS", {}).get("Layers") or [])
    if not diff_ids:
        raise TxgraphError(f"image {args.image!r} has no layers")
    ref = args.tag or thin_ref(image, args.image)
    daemon = Daemon(args.state_dir)
    online = daemon.available()
    progress = Progress(label="make-thin")

    def handle(event: dict[str, Any]) -> None:
        if event["event"] == "progress" and event["total"]:
            index = event["index"]
            progress.show(event["done"], event["total"], f"layer {index + 1}/{len(diff_ids)}")
        elif event["event"] == "layer" and not args.json:
            how = "already in the pool" if event["existed"] else "stored"
            print(f"layer {event['index'] + 1}/{len(diff_ids)} {event['chain_id'][7:19]}: {how}",
                  file=sys.stderr)

    def publish(layers: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if online:
            for line in daemon.stream("/thin/publish", {"layers": layers}):
                event = json.loads(line)
                if event["event"] == "error":
                    raise TxgraphError(event["error"])
                if event["event"] == "done":
                    return list(event["layers"])
                handle(event)
            raise TxgraphError("txgraph's admin socket closed before make-thin finished")

        async def work(driver: Any, snapshotter: Any) -> list[dict[str, Any]]:
            return await publish_layers(driver, layers, handle)

        return list(offline(args, work))

    if online:
        info = daemon.call("/thin/info")
        if "Err" in info:
            raise TxgraphError(info["Err"])
    else:
        info = offline(args, lambda driver, snapshotter: thin_info(driver))
    if args.pool is not None and args.pool != info["pool"]:
        raise TxgraphError(
            f"--pool {args.pool}: this txgraph keeps its layers in pool {info['pool']}; "
            "make thin images with a txgraph on that pool"
        )
    present = publish([{"diff_id": d, "path": None} for d in diff_ids])
    missing = not all(r["existed"] for r in present)
    with tempfile.TemporaryDirectory(prefix="txgraph-make-thin-", dir=args.tmpdir) as tmp:
        saved = save_image(engine, image["Id"], tmp, layers=missing)
        if len(saved["paths"]) != len(diff_ids):
            raise TxgraphError(
                f"docker save {args.image} gave {len(saved['paths'])} layers, its config {len(diff_ids)}"
            )
        if missing:
            results = publish(
                [{"diff_id": d, "path": p} for d, p in zip(diff_ids, saved["paths"], strict=True)]
            )
        else:
            results = present
            for r in results:
                handle({"event": "layer", **r})
    sizes = saved["sizes"]
    results = [{**r, "size": size} for r, size in zip(results, sizes, strict=True)]
    descriptor = thin.render(
        info["fsid"],
        info["pool"],
        info["namespace"],
        info["filesystem"],
        [thin.ThinLayer(r["snapshot"], r["chain_id"], r["diff_id"], s) for r, s in zip(results, sizes, strict=True)],
        image["Id"],
        saved["config"],
        time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    archive, thin_id = thin_tar(saved["config"], descriptor, ref, args.image)
    engine.load(archive)
    report = {
        "image": args.image,
        "image_id": image["Id"],
        "thin_image": ref,
        "thin_id": thin_id,
        "layers": results,
        "descriptor": json.loads(descriptor),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        stored = sum(1 for r in results if not r["existed"])
        where = "/".join(p for p in (info["pool"], info["namespace"]) if p)
        print(
            f"{ref} ({thin_id[7:19]}): thin image of {args.image}; {len(results)} layer(s) in "
            f"pool {where}, {stored} stored now, {len(results) - stored} already there"
        )
    return 0
