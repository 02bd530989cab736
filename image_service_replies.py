"""What a reply says: each model's account of a delete, and the reply built from it.

This module owns which model ids are refused; ``RequestedModels``, the ids
one call names, answered in order; how a deletion ended (``Ending``, with
its ``Failure``, if any); ``ModelImages`` (what a delete found of one
model, what MongoDB reported removed, what was kept); how the counts of
models deleted together are shared out when MongoDB removed fewer than
were wanted; and the reply messages and outcomes: deleted, nothing to
delete, unfinished (a failure, or time run out between rounds), a dry
run's preview, and the repeat of a model named twice in a batch.
"""

import dataclasses
import unicodedata
from typing import NamedTuple

import pymongo.errors

import image_service_pb2 as pb2

MAX_MODEL_ID_LENGTH = 256


def cut_for_reply(model_id):
    """A model id as a reply may carry it. An invalid one can be megabytes
    long; cut, and marked so, a batch of them stays far below a caller's
    4 MB receive limit."""
    if len(model_id) <= MAX_MODEL_ID_LENGTH:
        return model_id
    return f"{model_id[:MAX_MODEL_ID_LENGTH]}...[cut from {len(model_id)} characters]"


@dataclasses.dataclass
class ModelImages:
    """What a delete found of one model and what removing it did, over all
    its rounds. Removals are counted as MongoDB reported them."""

    found_images: int = 0
    deleted_images: int = 0
    deleted_files: int = 0
    kept_files: int = 0  # still referenced by another model
    missing_files: int = 0  # referenced, but already gone
    files_counted_earlier: int = 0  # shared with a model deleted with it, counted there
    invalid_references: int = 0
    counts_shared_out: bool = False
    file_bytes: int = 0  # dry runs only


def split_among_models(wanted, removed):
    """Splits the ``removed`` count among models that wanted ``wanted[i]``
    each. Exact for one model, and whenever everything wanted was removed;
    otherwise (a concurrent delete, files already gone) the shortfall is
    taken from the last models, so the shares still add up to ``removed``."""
    shortfall, shares = sum(wanted) - removed, []
    for count in reversed(wanted):
        taken = min(count, shortfall)
        shortfall -= taken
        shares.append(count - taken)
    return shares[::-1]


def credit(found, model_ids, wanted, removed, field):
    """Adds what MongoDB ``removed`` to the models' ``field``, shared out as
    they ``wanted`` it; returns each model's shortfall."""
    shares = split_among_models(wanted, removed)
    shared_out = sum(1 for count in wanted if count) > 1 and removed != sum(wanted)
    for model_id, count, share in zip(model_ids, wanted, shares, strict=True):
        images = found[model_id]
        setattr(images, field, getattr(images, field) + share)
        images.counts_shared_out |= shared_out and count > 0
    return [count - share for count, share in zip(wanted, shares, strict=True)]


def plural(count, noun):
    return f"{count} {noun}{'' if count == 1 else 's'}"


def preview_reply(model_id, images):
    """The reply for one model in a dry run."""
    notes = [f"would delete {plural(images.deleted_images, 'image')} and"
             f" {plural(images.deleted_files, 'file')} ({images.file_bytes} bytes)"]
    if images.kept_files:
        notes.append(f"would keep {plural(images.kept_files, 'file')} referenced by another model")
    return pb2.DeleteImageResponse(
        success=True,
        outcome=pb2.OUTCOME_DELETED if images.deleted_images else pb2.OUTCOME_NOTHING_TO_DELETE,
        model_id=model_id,
        deleted_images=images.deleted_images,
        deleted_files=images.deleted_files,
        file_bytes=images.file_bytes,
        message="; ".join(notes) + "; nothing was changed",
    )


def deletion_notes(images):
    """What a reply says about a model's removal, beyond the counts."""
    notes = []
    if images.kept_files:
        notes.append(f"kept {plural(images.kept_files, 'file')} still referenced by another model")
    if images.files_counted_earlier:
        notes.append(f"{plural(images.files_counted_earlier, 'file')} shared with a model deleted with it,"
                     " counted there")
    if images.counts_shared_out:
        notes.append("counts shared out among the models deleted with it: some files were already gone or"
                     " a concurrent delete removed some images first")
    else:
        if images.missing_files:
            notes.append(f"{plural(images.missing_files, 'reference')} to a file already gone")
        if images.found_images > images.deleted_images:
            taken = images.found_images - images.deleted_images
            notes.append(f"{taken} removed by a concurrent delete first")
    if images.invalid_references:
        notes.append(f"{plural(images.invalid_references, 'reference')} had no valid file id")
    return notes


def deletion_reply(model_id, images):
    """The reply for one model none of whose images remains. A model this
    call read images of was deleted, even when a concurrent delete removed
    them first: only a model it found nothing of had nothing to delete."""
    if images.found_images == 0:
        return pb2.DeleteImageResponse(
            success=True,
            outcome=pb2.OUTCOME_NOTHING_TO_DELETE,
            model_id=model_id,
            message=f"no images of model {model_id!r}; nothing to delete",
        )
    counts = f"deleted {plural(images.deleted_images, 'image')} and {plural(images.deleted_files, 'file')}"
    return pb2.DeleteImageResponse(
        success=True,
        outcome=pb2.OUTCOME_DELETED,
        model_id=model_id,
        deleted_images=images.deleted_images,
        deleted_files=images.deleted_files,
        message="; ".join([counts, *deletion_notes(images)]),
    )


def unfinished_reply(model_id, images, outcome, reason):
    """The reply for one model whose images may not all be gone: success is
    false, and the counts say what this call removed all the same."""
    removed = ""
    if images.deleted_images or images.deleted_files:
        removed = (f"; deleted {plural(images.deleted_images, 'image')} and"
                   f" {plural(images.deleted_files, 'file')} first")
    return pb2.DeleteImageResponse(
        success=False,
        outcome=outcome,
        model_id=model_id,
        deleted_images=images.deleted_images,
        deleted_files=images.deleted_files,
        message=reason + removed,
    )


def repeat_reply(first):
    """The reply for a model named again in the same batch: the same result,
    with the counts left to the first mention."""
    return pb2.DeleteImageResponse(
        success=first.success, outcome=first.outcome, model_id=first.model_id,
        message="named earlier in this batch: see the result for its first mention, which counts its images")


class Failure(NamedTuple):
    """What a reply says of a failed deletion: its outcome, and a message safe for callers."""

    outcome: int
    message: str


class Ending(NamedTuple):
    """How a call's deletion ended: whether none of its models' images is
    left, and its failure, if it failed."""

    finished: bool
    failure: Failure | None = None


def classify_failure(error):
    """The Failure a failed database call is reported as.

    The driver's own text stays in the server log (redacted): it can name
    hosts and users, and callers can do nothing with it.
    """
    unavailable = (pymongo.errors.ConnectionFailure, pymongo.errors.ExecutionTimeout)
    if isinstance(error, unavailable) or getattr(error, "timeout", False):
        return Failure(pb2.OUTCOME_UNAVAILABLE, "database unavailable or too slow; retry later")
    return Failure(pb2.OUTCOME_INTERNAL, "internal error while deleting; see the server log")


def reply_for(model_id, images, dry_run, ending):
    """The reply for one model, from its account and how the deletion ended."""
    if ending.failure:
        return unfinished_reply(model_id, images, ending.failure.outcome, ending.failure.message)
    if dry_run:
        return preview_reply(model_id, images)
    if not ending.finished:
        return unfinished_reply(model_id, images, pb2.OUTCOME_INCOMPLETE,
                                "more images remain: this call's time ran out; call again to continue")
    return deletion_reply(model_id, images)


def invalid_model_id_reason(model_id):
    """Why a model id is refused, or None when it is acceptable."""
    if not model_id:
        return "model_id is empty"
    if len(model_id) > MAX_MODEL_ID_LENGTH:
        return f"model_id is longer than {MAX_MODEL_ID_LENGTH} characters"
    if any(unicodedata.category(ch) == "Cc" for ch in model_id):
        return "model_id contains control characters"
    return None


class RequestedModels:
    """The model ids one call names, in order, with why any is refused."""

    def __init__(self, model_ids: list[str], request_id: str = "-"):
        self.model_ids = model_ids
        self.request_id = request_id
        self.reasons = {model_id: invalid_model_id_reason(model_id) for model_id in model_ids}
        self.valid = [model_id for model_id, reason in self.reasons.items() if reason is None]

    def replies(self, found, dry_run, ending):
        """One reply per id named, in order; a repeated id's refers to its first."""
        replies, first_reply = [], {}
        for model_id in self.model_ids:
            if self.reasons[model_id]:
                replies.append(pb2.DeleteImageResponse(
                    success=False, outcome=pb2.OUTCOME_INVALID_ARGUMENT,
                    model_id=cut_for_reply(model_id), message=self.reasons[model_id]))
            elif model_id in first_reply:
                replies.append(repeat_reply(first_reply[model_id]))
            else:
                replies.append(reply_for(model_id, found[model_id], dry_run, ending))
                first_reply[model_id] = replies[-1]
        return replies

