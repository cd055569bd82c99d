"""Durable completion and feedback logs, one SQLite file shared by the scheduler and HTTP processes.

  * ``SqliteCompletionLog`` (completion_log.py): ``CompletionLog`` on SQLite, with running /
    finished / expired states and tombstones.
  * ``FeedbackStore`` / ``FeedbackInput`` / ``FeedbackResult`` / ``FeedbackRow`` (store.py,
    rows.py): idempotent, last-wins feedback rows, the pending poll, trained-step bookkeeping,
    the KTO export.
  * ``FeedbackDb`` (db.py): the schema and connection settings both share.
  * ``CompletionEntry`` (completion_entry.py): one finished choice, the value type both logs keep.
Nothing here imports torch, sglang or online/.
"""

from alchemist_sgl.feedback.completion_log import SqliteCompletionLog
from alchemist_sgl.feedback.db import FeedbackDb
from alchemist_sgl.feedback.rows import FeedbackInput, FeedbackResult, FeedbackRow
from alchemist_sgl.feedback.ratings import FeedbackStore

__all__ = ["FeedbackDb", "FeedbackInput", "FeedbackResult", "FeedbackRow", "FeedbackStore",
           "SqliteCompletionLog"]
