"""Where the cluster state lives: `open_store` picks the backend from one string, a file
path (SQLite, store/sqlite.py) or etcd://HOST:PORT[/PREFIX] (store/etcd.py). The interface
is store/base.py; docs/STORE.md has the details."""
from __future__ import annotations

import json
import os

from xoverlay.errors import XoError
from xoverlay.store.base import ETCD_SCHEME, LAB_SUFFIX, Store, Tls, default_path, is_etcd
from xoverlay.store.sqlite import SqliteStore


def _routable(url: str) -> bool:
    """Does this netns have a route to the URL's host? (A UDP connect sends nothing.)"""
    import socket
    host = url[len(ETCD_SCHEME):].split("/")[0].rsplit(":", 1)[0]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((host, 9))
            return True
        except OSError:
            return False


def lab_store(path: str) -> str | None:
    """The etcd URL a namespace lab made for this store path runs on (`lab up --store
    etcd`), if any: while that lab is up, the path stands for the lab's etcd, so the host's
    CLI sees the lab's cluster with the same --state as the SQLite lab. The lab's etcd has
    an address on the underlay (for the lab's namespaces) and one on a private link to the
    host (for the host's CLI): the host's if this netns has a route to it (the host), else
    the underlay's (a lab namespace)."""
    try:
        with open(path + LAB_SUFFIX) as f:
            etcd = json.load(f).get("etcd") or {}
    except (OSError, ValueError, AttributeError):
        return None
    if not etcd.get("url"):
        return None
    return etcd["url"] if _routable(etcd["url"]) else etcd.get("node_url")


def open_store(spec: str | None = None, tls: Tls = Tls()) -> Store:
    """The store named by `spec`: etcd://HOST:PORT[/PREFIX], or a file path (SQLite)."""
    spec = spec or default_path()
    if not is_etcd(spec):
        spec = lab_store(os.path.abspath(spec)) or spec
    if is_etcd(spec):
        from xoverlay.store.etcd import EtcdStore
        return EtcdStore(spec, tls)
    if tls:
        raise XoError(f"--store-ca/--store-cert/--store-key are for etcd, and the store is the file {spec}")
    return SqliteStore(spec)
