"""Horizontal scale: two replicas of the service, separate processes sharing
nothing but the database (the real MongoDB or FerretDB of TEST_MONGO_URI),
deleting overlapping models, and models that share files, at the same time.
The scenario runs once; each test states one thing it must leave true."""

import concurrent.futures
import os
import random

import pytest

import image_service_pb2 as pb2
import image_service_store as store
from support import ServerProcess, empty_real_database, run_server_process, upload

MODELS = [f"model-{number}" for number in range(12)]
# Models nobody deletes, each referencing a file of a deleted model.
KEEPERS = {"keeper-0": "model-0", "keeper-1": "model-5"}
IMAGES_PER_MODEL = 2
CALLS_AT_ONCE = 8


def share_files(db):
    """Each deleted model's first file is referenced by the next model too (a
    ring: every pair of neighbours shares a file), and by a keeper for two of
    them."""
    first_files = {model_id: db.images.find_one({"model_id": model_id})["image_id"] for model_id in MODELS}
    for number, model_id in enumerate(MODELS):
        neighbour = MODELS[(number + 1) % len(MODELS)]
        db.images.insert_one({"name": f"{neighbour}-shared.jpg", "image_id": first_files[model_id],
                              "model_id": neighbour})
    for keeper, owner in KEEPERS.items():
        db.images.insert_one({"name": f"{keeper}-shared.jpg", "image_id": first_files[owner],
                              "model_id": keeper})


@pytest.fixture(scope="module")
def after_two_replicas(tmp_path_factory):
    """The database after two replicas deleted every model of MODELS (after
    --create-indexes, as in production), and each call's model with its reply."""
    tmp_path = tmp_path_factory.mktemp("replicas")
    for db in empty_real_database():
        for model_id in [*MODELS, *KEEPERS]:
            for _ in range(IMAGES_PER_MODEL):
                upload(db, model_id)
        share_files(db)
        settings = {"MONGO_URI": os.environ["TEST_MONGO_URI"], "MONGO_DB": db.name}
        indexed = run_server_process(settings, "--create-indexes", cwd=tmp_path)
        assert indexed.returncode == 0, indexed.stderr
        replicas = [ServerProcess(tmp_path, settings) for _ in range(2)]
        try:
            replies = delete_through(replicas)
        finally:
            for replica in replicas:
                replica.stop()
        yield db, replies


def delete_through(replicas):
    """Every model of MODELS asked of every replica, the calls shuffled and
    CALLS_AT_ONCE in flight: each call's model, with its reply."""
    calls = [(replica, model_id) for model_id in MODELS for replica in replicas]
    random.Random(23).shuffle(calls)

    def call(replica_and_model):
        replica, model_id = replica_and_model
        request = pb2.DeleteImageRequest(model_id=model_id)
        return model_id, replica.stub.DeleteImageByModelId(request, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(CALLS_AT_ONCE) as pool:
        return list(pool.map(call, calls))


def test_no_call_says_success_while_an_image_of_its_model_is_left(after_two_replicas):
    db, replies = after_two_replicas
    succeeded = {model_id for model_id, reply in replies if reply.success}
    assert succeeded == set(MODELS), [(model_id, reply.message) for model_id, reply in replies]
    assert db.images.count_documents({"model_id": {"$in": MODELS}}) == 0


def test_every_image_is_deleted_by_exactly_one_call(after_two_replicas):
    _, replies = after_two_replicas
    # Each model's own images, and the neighbour's image sharing its file.
    assert sum(reply.deleted_images for _, reply in replies) == len(MODELS) * (IMAGES_PER_MODEL + 1)


def test_no_file_a_remaining_image_references_is_lost(after_two_replicas):
    db, _ = after_two_replicas
    remaining = [store.referenced_file_id(image["image_id"]) for image in db.images.find()]
    assert sorted(image["model_id"] for image in db.images.find()) == sorted(
        [keeper for keeper in KEEPERS for _ in range(IMAGES_PER_MODEL + 1)])
    files = {file["_id"]: file["length"] for file in db["fs.files"].find({"_id": {"$in": remaining}})}
    assert set(files) == set(remaining)
    for file_id, length in files.items():
        chunks = db["fs.chunks"].find({"files_id": file_id}).sort("n")
        assert sum(len(chunk["data"]) for chunk in chunks) == length


def test_no_file_or_chunk_is_left_that_no_image_references(after_two_replicas):
    db, _ = after_two_replicas
    referenced = {store.referenced_file_id(image["image_id"]) for image in db.images.find()}
    left = [file["filename"] for file in db["fs.files"].find() if file["_id"] not in referenced]
    assert left == []
    assert set(db["fs.chunks"].distinct("files_id")) <= referenced
