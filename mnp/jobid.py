"""Job ids (``42``, ``42:7``, ``42#3``, ``42#3.1``): one type, parsed and rendered in
one place. It lives in the agent package, which must stay standard-library-only
for Python 3.8 because it is shipped to hosts; this is its name for the rest of mnp."""

from mnp.agent.jobid import SEPARATORS, JobId, JobIdError, split, top_of

__all__ = ["SEPARATORS", "JobId", "JobIdError", "split", "top_of"]
