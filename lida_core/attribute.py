"""`lida attribute`: decisions for a few files now, in this process (no Beam, no server).

The same decisions as a scan's (`index.search_and_decide` with the current model and its
published index); each path that cannot be listed or decoded gets its own error row.
"""

from __future__ import annotations

from collections.abc import Sequence

from lida_core import index as gallery_index
from lida_core.decode import decode_inputs
from lida_core.inputs import InputError, display_uri, list_inputs
from lida_core.lifecycle import load_model
from lida_core.workspace import Workspace


def attribute_files(ws: Workspace, paths: Sequence[str]) -> list[dict]:
    config = ws.config()
    loaded = load_model(ws)
    decider, index = gallery_index.query_decider(ws, loaded.version, loaded.meta, config)
    results = []
    listed: list[tuple[str, str | None]] = []  # (URI, why it cannot be listed), in the order given
    for path in paths:
        try:
            listed += [(u, None) for u in list_inputs([path])]
        except InputError as exc:  # a missing path is that path's answer, not the end of every other's
            listed.append((display_uri(str(path)), "no such file or folder" if "no such" in str(exc) else str(exc)))
    decoded = decode_inputs([uri for uri, problem in listed if not problem], jpeg_space=loaded.model.fingerprint.jpeg)
    failed, found = dict(decoded.errors), {uri: i for i, uri in enumerate(decoded.uris)}
    decisions = (gallery_index.search_and_decide(decider, index, loaded.embed(decoded.pixels), decoded.jpeg, loaded.version,
                                                  decoded.quality, decoded.dims)
                 if decoded.uris else [])
    lineage = {"model_version": loaded.version, "index_version": index.version if index else "none",
               "fingerprint": config.fingerprint}
    for uri, problem in listed:
        problem = problem or failed.get(uri)
        results.append({"uri": uri, "error": problem} if problem else {"uri": uri, **decisions[found[uri]], **lineage})
    return results
