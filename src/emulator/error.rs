//! The upstream's errors in AWS REST-JSON form: the model's HTTP status, an `x-amzn-ErrorType`
//! header naming the exception, a JSON body with `message` and the modelled members, and
//! `Retry-After` where the model puts it.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use serde_json::json;

/// The exceptions the two operations declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum ErrorKind {
    AccessDeniedException,
    InternalServerErrorException,
    ResourceNotFoundException,
    ThrottlingException,
    ValidationException,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AccessDeniedException => "AccessDeniedException",
            Self::InternalServerErrorException => "InternalServerErrorException",
            Self::ResourceNotFoundException => "ResourceNotFoundException",
            Self::ThrottlingException => "ThrottlingException",
            Self::ValidationException => "ValidationException",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::AccessDeniedException,
            Self::InternalServerErrorException,
            Self::ResourceNotFoundException,
            Self::ThrottlingException,
            Self::ValidationException,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    fn status(self) -> StatusCode {
        match self {
            Self::AccessDeniedException => StatusCode::FORBIDDEN,
            Self::InternalServerErrorException => StatusCode::INTERNAL_SERVER_ERROR,
            Self::ResourceNotFoundException => StatusCode::NOT_FOUND,
            Self::ThrottlingException => StatusCode::TOO_MANY_REQUESTS,
            Self::ValidationException => StatusCode::BAD_REQUEST,
        }
    }
}

/// The model's `ValidationExceptionReason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValidationReason {
    UnknownOperation,
    CannotParse,
    FieldValidationFailed,
    Other,
}

impl ValidationReason {
    fn as_str(self) -> &'static str {
        match self {
            Self::UnknownOperation => "UNKNOWN_OPERATION",
            Self::CannotParse => "CANNOT_PARSE",
            Self::FieldValidationFailed => "FIELD_VALIDATION_FAILED",
            Self::Other => "OTHER",
        }
    }
}

/// An error response of the emulated API.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiError {
    Validation {
        reason: ValidationReason,
        message: String,
        fields: Vec<(String, String)>,
    },
    NotFound {
        message: String,
        resource_id: String,
        resource_type: &'static str,
    },
    Throttling {
        message: String,
        retry_after_secs: u64,
    },
    AccessDenied {
        message: String,
    },
    Internal {
        message: String,
    },
    /// A request whose signature AWS would refuse (403, `x-amzn-ErrorType` as named:
    /// `InvalidSignatureException`, `ExpiredTokenException`, `UnrecognizedClientException`).
    Unauthenticated {
        error_type: &'static str,
        message: String,
    },
}

impl ApiError {
    /// A ValidationException with reason FIELD_VALIDATION_FAILED naming each `(field, why)`.
    pub fn fields(fields: Vec<(String, String)>) -> Self {
        let names: Vec<&str> = fields.iter().map(|(n, _)| n.as_str()).collect();
        Self::Validation {
            reason: ValidationReason::FieldValidationFailed,
            message: format!("invalid fields: {}", names.join(", ")),
            fields,
        }
    }

    /// What a fault of `kind` answers (a throttle asks to retry after `retry_after_secs`).
    pub fn injected(kind: ErrorKind, retry_after_secs: u64) -> Self {
        let message = format!("{} injected by the emulator's faults", kind.as_str());
        match kind {
            ErrorKind::AccessDeniedException => Self::AccessDenied { message },
            ErrorKind::InternalServerErrorException => Self::Internal { message },
            ErrorKind::ResourceNotFoundException => {
                Self::NotFound { message, resource_id: "injected".into(), resource_type: "farm" }
            }
            ErrorKind::ThrottlingException => Self::Throttling { message, retry_after_secs },
            ErrorKind::ValidationException => {
                Self::Validation { reason: ValidationReason::Other, message, fields: vec![] }
            }
        }
    }

    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::Validation { .. } => ErrorKind::ValidationException,
            Self::NotFound { .. } => ErrorKind::ResourceNotFoundException,
            Self::Throttling { .. } => ErrorKind::ThrottlingException,
            Self::AccessDenied { .. } | Self::Unauthenticated { .. } => ErrorKind::AccessDeniedException,
            Self::Internal { .. } => ErrorKind::InternalServerErrorException,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = self.kind();
        let error_type = match &self {
            Self::Unauthenticated { error_type, .. } => error_type,
            _ => kind.as_str(),
        };
        let (body, retry_after) = match self {
            Self::Validation { reason, message, fields } => {
                let list: Vec<_> =
                    fields.into_iter().map(|(name, message)| json!({"name": name, "message": message})).collect();
                (json!({"message": message, "reason": reason.as_str(), "fieldList": list}), None)
            }
            Self::NotFound { message, resource_id, resource_type } => {
                (json!({"message": message, "resourceId": resource_id, "resourceType": resource_type}), None)
            }
            Self::Throttling { message, retry_after_secs } => (
                json!({"message": message, "serviceCode": "deadline", "quotaCode": "sessions-statistics-aggregation"}),
                Some(retry_after_secs),
            ),
            Self::AccessDenied { message } | Self::Internal { message } | Self::Unauthenticated { message, .. } => {
                (json!({ "message": message }), None)
            }
        };
        let mut response = (kind.status(), axum::Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert("x-amzn-ErrorType", HeaderValue::from_static(error_type));
        if let Some(secs) = retry_after {
            headers.insert("Retry-After", HeaderValue::from(secs));
        }
        response
    }
}
