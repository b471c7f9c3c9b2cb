#!/usr/bin/env python3
"""Writes an OCI image layout tarball, without a registry, that `ctr images import` loads.

usage: oci-image.py OUT.tar REF CONFIG_JSON LAYER.tar[,LAYER.tar...] [REF CONFIG_JSON LAYERS]...
  Each triple is an image named REF whose layers are the given (uncompressed) tar files,
  bottom first, and whose image config is CONFIG_JSON
  (Entrypoint, Cmd, Env, User, StopSignal...). Images that name the same layer file share
  one blob. Layers are stored uncompressed: cheap on CPU, and the tarball never leaves
  the machine.
"""
import hashlib
import io
import json
import sys
import tarfile
import time


def digest_file(path):
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            n += len(chunk)
    return "sha256:" + h.hexdigest(), n


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def add_bytes(out, name, data):
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0
    out.addfile(info, io.BytesIO(data))


def main(argv):
    if len(argv) < 5 or (len(argv) - 2) % 3:
        sys.exit(__doc__)
    out_path, args = argv[1], argv[2:]
    images = [args[i:i + 3] for i in range(0, len(args), 3)]
    layers = {}  # path -> (digest, size)
    blobs = {}  # digest -> bytes (configs and manifests)
    manifests = []
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for ref, config, paths in images:
        descs = []
        for path in paths.split(","):
            if path not in layers:
                layers[path] = digest_file(path)
            descs.append(layers[path])
        cfg = json.dumps({
            "architecture": "amd64",
            "os": "linux",
            "created": created,
            "config": json.loads(config),
            "rootfs": {"type": "layers", "diff_ids": [d for d, _ in descs]},
            # buildah refuses a base image whose history has fewer entries than layers.
            "history": [{"created": created, "created_by": "pgflip scripts/oci-image.py"}
                        for _ in descs],
        }).encode()
        blobs[digest(cfg)] = cfg
        man = json.dumps({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": digest(cfg), "size": len(cfg)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": d, "size": n} for d, n in descs],
        }).encode()
        blobs[digest(man)] = man
        manifests.append({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest(man), "size": len(man),
            "platform": {"architecture": "amd64", "os": "linux"},
            "annotations": {"io.containerd.image.name": ref,
                            "org.opencontainers.image.ref.name": ref.rsplit(":", 1)[-1]},
        })
    index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
             "manifests": manifests}
    with tarfile.open(out_path, "w") as out:
        add_bytes(out, "oci-layout", b'{"imageLayoutVersion":"1.0.0"}')
        add_bytes(out, "index.json", json.dumps(index).encode())
        for d, data in blobs.items():
            add_bytes(out, "blobs/sha256/" + d[7:], data)
        for path, (d, _) in layers.items():
            out.add(path, arcname="blobs/sha256/" + d[7:])
    for m in manifests:
        print(m["annotations"]["io.containerd.image.name"], m["digest"])


if __name__ == "__main__":
    main(sys.argv)
