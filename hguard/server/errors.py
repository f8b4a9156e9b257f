"""Errors the server answers with: the OpenAI error body, its status, and the 499 of a client that left."""

from __future__ import annotations

CLIENT_CLOSED = 499  # nginx's status for a request whose client closed the connection first


class APIError(Exception):
    """An error the client caused or must handle; rendered as the OpenAI error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def context_exceeded(context: int, prompt: int, completion: int, param: str) -> APIError:
    """The OpenAI API's 400 for a request that does not fit the model's context."""
    return APIError(400, f"This model's maximum context length is {context} tokens. However, you requested "
                    f"{prompt + completion} tokens ({prompt} in the prompt, {completion} for the completion).",
                    param=param, code="context_length_exceeded")
