"""Verified copies for the service (`verify=true`): the query's local features from its upload, the hits' from
their files read as thumbnails are (regular files inside the collection's folders, capped), under the
request's deadline and the decode budget."""

from __future__ import annotations

import time

import numpy as np

from ..copies import WORK_SIDE, LocalFeatures, local_features, opencv, unreadable
from ..errors import ImageError, PipelineError
from ..images import decode_cost, decode_rgb, read_regular_file
from ..search import QueryResult, Searcher, check_deadline
from .limits import DecodeBudget, RequestError
from .thumbnails import THUMB_MAX_BYTES


def check_verify(verify: bool) -> None:
    """verify=true on a server without OpenCV answers 501, saying what to install."""
    if verify:
        try:
            opencv()
        except PipelineError as exc:
            raise RequestError(str(exc), 501) from None


def verify_uploads(
    searcher: Searcher, results: list[QueryResult], uploads: list[bytes], budget: DecodeBudget, deadline: float
) -> list[QueryResult]:
    """Each upload's hits verified (an upload that failed keeps its error); decoding an upload again for its
    local features takes room in the decode budget, as its first decoding did."""
    out = []
    for result, data in zip(results, uploads, strict=True):
        if result.error:
            out.append(result)
            continue
        try:
            with budget.take(decode_cost(data), max(0.0, deadline - time.monotonic())):
                query = local_features(np.asarray(decode_rgb(data, WORK_SIDE)), mirrored=True)
        except ImageError as exc:
            query = unreadable(str(exc))
        out.append(verify_result(searcher, result, query, deadline))
    return out


def verify_result(searcher: Searcher, result: QueryResult, query: LocalFeatures, deadline: float) -> QueryResult:
    """One result's hits verified against the query's features (Searcher.verified), if time remains."""
    check_deadline(deadline, "verifying the hits")
    return searcher.verified(result, query, lambda path: candidate_features(searcher, path))


def candidate_features(searcher: Searcher, path: str, mirrored: bool = False) -> LocalFeatures:
    """An indexed file's local features, read as a thumbnail's file is; unreadable (with why) otherwise."""
    try:
        data = read_regular_file(path, THUMB_MAX_BYTES, searcher.roots)
        return local_features(np.asarray(decode_rgb(data, WORK_SIDE)), mirrored=mirrored)
    except ImageError as exc:
        return unreadable(str(exc))
