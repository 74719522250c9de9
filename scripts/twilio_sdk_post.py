"""Posts one whole call's callbacks, signed by Twilio's own Python SDK.

Usage: python3 twilio_sdk_post.py BASE_URL PUBLIC_BASE_URL BUSINESS_ID AUTH_TOKEN
Prints each answer's status; exits non-zero if any is not 2xx.
"""
import sys
import urllib.parse
import urllib.request

from twilio.request_validator import RequestValidator

base, public, business, token = sys.argv[1:5]
validator = RequestValidator(token)
sid = "CA5d0c0a3f1b2e4d6c8a9b0c1d2e3f4a5b"
common = {"AccountSid": "AC00000000000000000000000000000001", "CallSid": sid, "Direction": "inbound",
          "From": "+14155552671", "To": "+15005550006", "CallerName": "Jane Doe",
          "CallbackSource": "call-progress-events", "ApiVersion": "2010-04-01"}
callbacks = [
    ("call-status", {**common, "CallStatus": "ringing", "SequenceNumber": "0",
                     "Timestamp": "Tue, 25 Nov 2025 12:00:01 +0000"}),
    ("call-status", {**common, "CallStatus": "in-progress", "SequenceNumber": "1",
                     "Timestamp": "Tue, 25 Nov 2025 12:00:03 +0000"}),
    ("recording", {"AccountSid": common["AccountSid"], "CallSid": sid,
                   "RecordingSid": "RE22222222222222222222222222222222", "RecordingStatus": "completed",
                   "RecordingUrl": "https://api.twilio.com/2010-04-01/Accounts/AC00/Recordings/RE22222222222222222222222222222222",
                   "RecordingStartTime": "Tue, 25 Nov 2025 12:00:03 +0000"}),
    ("call-status", {**common, "CallStatus": "completed", "SequenceNumber": "2", "CallDuration": "125",
                     "Timestamp": "Tue, 25 Nov 2025 12:02:08 +0000"}),
    ("transcription", {"AccountSid": common["AccountSid"], "CallSid": sid,
                       "TranscriptionSid": "TR33333333333333333333333333333333", "TranscriptionStatus": "completed",
                       "TranscriptionText": "Hi, I'd like to book a cleaning, please."}),
]
failed = False
for endpoint, params in callbacks:
    path = f"/webhooks/twilio/{business}/{endpoint}"
    signature = validator.compute_signature(public + path, params)
    request = urllib.request.Request(base + path, data=urllib.parse.urlencode(params).encode(),
                                     headers={"X-Twilio-Signature": signature,
                                              "Content-Type": "application/x-www-form-urlencoded"})
    try:
        status = urllib.request.urlopen(request).status
    except urllib.error.HTTPError as e:
        status = e.code
    print(endpoint, status)
    failed |= not 200 <= status < 300
sys.exit(1 if failed else 0)
