"""Fixtures for the store tests: a local S3-compatible server, and stores on every backend."""

from __future__ import annotations

import logging
import os
import uuid

import pytest

from gradstore import GradStore


@pytest.fixture(scope="session")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 (port 0: the OS picks a free one), started once and stopped at the end."""
    pytest.importorskip("moto")
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id="testing", aws_secret_access_key="testing").create_bucket(Bucket="gradstore-test")
    yield endpoint
    server.stop()


@pytest.fixture
def s3_location(s3_endpoint):
    """A fresh s3:// prefix and the storage options that reach the local server."""
    options = {"endpoint_url": s3_endpoint, "key": "testing", "secret": "testing"}
    return f"s3://gradstore-test/{uuid.uuid4().hex}", options


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    """(uri, storage_options) for every backend: contract tests run against each."""
    if request.param == "local":
        return str(tmp_path / "store"), None
    return request.getfixturevalue("s3_location")


@pytest.fixture
def make_store(location):
    """Create a store on the parametrised backend; returns (store, reopen) where reopen() opens it again."""
    uri, options = location

    def make(**kwargs):
        kwargs.setdefault("dim", 8)
        kwargs.setdefault("vocab_size", 64)
        kwargs.setdefault("dtype", "float32")
        store = GradStore.create(uri, storage_options=options, **kwargs)
        return store, lambda: GradStore.open(uri, storage_options=options)

    return make
