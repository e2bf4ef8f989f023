"""Server-sent events: `data: {json}` per chunk, an error event if generation fails, `data: [DONE]`."""
from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator

from starlette.background import BackgroundTask
from starlette.responses import StreamingResponse

from jaxpaged.engine.async_llm import EngineDeadError, RequestGroup
from jaxpaged.serve.errors import error_body

logger = logging.getLogger("jaxpaged.serve")


def sse_response(chunks: AsyncIterator[dict], group: RequestGroup) -> StreamingResponse:
    """Stream `chunks`; the group is aborted however the stream ends (disconnect included)."""

    async def events() -> AsyncIterator[str]:
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
        except EngineDeadError as e:  # status 200 is already sent: report in the stream
            yield f"data: {json.dumps(error_body(str(e), 503))}\n\n"
        except Exception as e:  # noqa: BLE001 - a bug, but the client still gets a clean end
            logger.exception("stream failed")
            yield f"data: {json.dumps(error_body(f'internal error: {e!r}', 500))}\n\n"
        finally:
            group.abort()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"}, background=BackgroundTask(group.abort))
