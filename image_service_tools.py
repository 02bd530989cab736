"""The operator's tools, as the server's command line runs them.

This module owns ``--create-indexes`` and ``--sweep-orphans`` of
``image_service_server.py``: their options, and a run of either against the
database with its output and exit code (0 done, 1 MongoDB could not do it).
What the sweep finds and removes is ``image_service_sweep.py``'s; which
indexes deletes need is ``image_service_store.py``'s.
"""

import logging

import pymongo.errors

import image_service_sweep as sweep
from image_service_console import tool_failure
from image_service_store import create_indexes, describe_indexes

log = logging.getLogger("image_service")


def add_arguments(parser):
    """The tools' options, on the server's command line."""
    parser.add_argument("--create-indexes", action="store_true",
                        help="create the indexes deletes need (images.model_id, images.image_id,"
                             " GridFS's on fs.chunks) that are missing, then exit")
    sweep.add_arguments(parser)


def check_arguments(parser, args):
    """Refuses tool options that make no sense together; fills in the sweep's defaults."""
    sweep.check_arguments(parser, args)
    if args.create_indexes and args.sweep_orphans:
        parser.error("--create-indexes and --sweep-orphans are separate runs")


def asked_for(args):
    """Whether the command line runs a tool rather than the server."""
    return args.create_indexes or args.sweep_orphans


def run(args, db, database_description):
    """Runs the tool the command line names, on a synchronous database; its exit code."""
    try:
        if args.create_indexes:
            created = create_indexes(db)
            print(f"indexes present on {database_description}: {describe_indexes()};"
                  f" created: {describe_indexes(created) or 'none, all were there'}")
        else:
            sweep.run_sweep(db, args)
    except pymongo.errors.PyMongoError as error:
        action = ("cannot create the indexes" if args.create_indexes
                  else "sweep failed, nothing more was changed")
        log.error("%s", tool_failure(action, error, database_description))
        log.debug("%s: the driver said: %s", action, error)
        return 1
    return 0
