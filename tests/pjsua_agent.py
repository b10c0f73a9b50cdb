"""A pjsua2 (PJSIP) user agent for the end-to-end tests, run as its own process.

PJSIP runs its own threads; keeping it out of the pytest process keeps the tests
independent of it.  The agent registers with digest, then either waits for a call
and answers it (``--answer``) or places one (``--call URI``), holds it for
``--hold-for`` seconds and hangs up.  It prints one JSON object per line on
standard output for each milestone (``registered``, ``incoming``, ``confirmed``,
``disconnected``) and exits 0 when its part of the call completed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

import pjsua2 as pj


def say(event: str, **fields: object) -> None:
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


class Call(pj.Call):  # type: ignore[misc]
    def __init__(self, account: Account, call_id: int = pj.PJSUA_INVALID_ID) -> None:
        super().__init__(account, call_id)
        self.account = account
        self.confirmed = threading.Event()
        self.disconnected = threading.Event()
        self.last_status = 0

    def onCallState(self, prm: pj.OnCallStateParam) -> None:  # noqa: N802 - pjsua2 API
        info = self.getInfo()
        self.last_status = info.lastStatusCode
        if info.state == pj.PJSIP_INV_STATE_CONFIRMED:
            say("confirmed", status=info.lastStatusCode, remote=info.remoteUri)
            self.confirmed.set()
        elif info.state == pj.PJSIP_INV_STATE_DISCONNECTED:
            say("disconnected", status=info.lastStatusCode, reason=info.lastReason)
            self.disconnected.set()
            if self.account is not None:
                self.account.call_ended.set()

    def onCallMediaState(self, prm: pj.OnCallMediaStateParam) -> None:  # noqa: N802
        pass


class Account(pj.Account):  # type: ignore[misc]
    def __init__(self, answer: bool) -> None:
        super().__init__()
        self.answer = answer
        self.registered = threading.Event()
        self.calls: list[Call] = []
        self.call_ended = threading.Event()

    def onRegState(self, prm: pj.OnRegStateParam) -> None:  # noqa: N802 - pjsua2 API
        info = self.getInfo()
        if info.regIsActive:
            say("registered", status=prm.code)
            self.registered.set()
        elif prm.code >= 300:
            say("registration_failed", status=prm.code, reason=prm.reason)

    def onIncomingCall(self, prm: pj.OnIncomingCallParam) -> None:  # noqa: N802
        call = Call(self, prm.callId)
        self.calls.append(call)
        say("incoming", remote=call.getInfo().remoteUri)
        ringing = pj.CallOpParam()
        ringing.statusCode = 180
        call.answer(ringing)
        if self.answer:
            ok = pj.CallOpParam()
            ok.statusCode = 200
            call.answer(ok)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--domain", required=True)
    parser.add_argument("--proxy", required=True, help="host:port of the SIP server")
    parser.add_argument("--transport", choices=["udp", "tcp"], default="udp")
    parser.add_argument("--answer", action="store_true")
    parser.add_argument("--call")
    parser.add_argument("--hold-for", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=20.0)
    arguments = parser.parse_args()

    endpoint = pj.Endpoint()
    endpoint.libCreate()
    config = pj.EpConfig()
    config.logConfig.level = 1
    config.logConfig.consoleLevel = 1
    config.uaConfig.threadCnt = 1
    config.medConfig.noVad = True
    endpoint.libInit(config)
    transport_config = pj.TransportConfig()
    transport_config.port = 0
    transport_config.boundAddress = "127.0.0.1"
    kind = pj.PJSIP_TRANSPORT_UDP if arguments.transport == "udp" else pj.PJSIP_TRANSPORT_TCP
    endpoint.transportCreate(kind, transport_config)
    endpoint.libStart()
    endpoint.audDevManager().setNullDev()

    suffix = ";transport=tcp" if arguments.transport == "tcp" else ""
    account_config = pj.AccountConfig()
    account_config.idUri = f"sip:{arguments.user}@{arguments.domain}"
    account_config.regConfig.registrarUri = f"sip:{arguments.proxy}{suffix}"
    account_config.regConfig.timeoutSec = 300
    account_config.sipConfig.proxies.append(f"sip:{arguments.proxy}{suffix};lr")
    credentials = pj.AuthCredInfo("digest", "*", arguments.user, 0, arguments.password)
    account_config.sipConfig.authCreds.append(credentials)
    account_config.natConfig.viaRewriteUse = False
    account_config.natConfig.contactRewriteUse = False
    account_config.natConfig.sdpNatRewriteUse = False
    account = Account(arguments.answer)
    account.create(account_config)

    deadline = time.monotonic() + arguments.timeout
    status = 1
    try:
        if not account.registered.wait(arguments.timeout):
            say("timeout", waiting_for="registration")
            return 1
        if arguments.call:
            call = Call(account)
            call.makeCall(arguments.call, pj.CallOpParam(True))
            if not call.confirmed.wait(max(deadline - time.monotonic(), 0.1)):
                say("timeout", waiting_for="answer", status=call.last_status)
                return 1
            # The call's own duration: the scenario, not a wait for an event.
            time.sleep(arguments.hold_for)
            call.hangup(pj.CallOpParam(True))
            if call.disconnected.wait(max(deadline - time.monotonic(), 0.1)):
                status = 0
        elif account.call_ended.wait(max(deadline - time.monotonic(), 0.1)):
            status = 0
        else:
            say("timeout", waiting_for="a call to end")
    finally:
        # Leave without running the Python destructors of pjsua2 objects, which
        # assert on calls PJSIP already freed; the sockets close with the process.
        sys.stdout.flush()
        os._exit(status)


if __name__ == "__main__":
    sys.exit(main())
