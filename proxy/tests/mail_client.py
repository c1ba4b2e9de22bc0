#!/usr/bin/env python3
"""A real mail client for the session tests: Python's imaplib and poplib, which nobody on this
project wrote, logging in through the proxy.

It connects from --source (a loopback address other than the proxy's, so that the mailbox
server's log can show the client's own address), logs in, and with --append stores a message
over IMAP and reads it back, or with --expect finds a message over POP3. It prints what it saw
and exits 0 when everything went as asked; with --expect-failure a refused login is the success.
"""

import argparse
import imaplib
import poplib
import socket
import ssl
import sys


def parse_args():
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "mode",
        choices=["imap", "imaps", "imap-starttls", "pop3", "pop3s", "pop3-stls"],
    )
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--source", default="127.0.0.1")
    parser.add_argument("--user", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--cafile")
    parser.add_argument("--append", help="IMAP: subject of a message to store and read back")
    parser.add_argument("--expect", help="POP3: subject of a message that must be there")
    parser.add_argument("--expect-failure", action="store_true")
    return parser.parse_args()


ARGS = parse_args()
TIMEOUT = 20


def connect():
    return socket.create_connection(
        (ARGS.host, ARGS.port), TIMEOUT, source_address=(ARGS.source, 0)
    )


def context():
    return ssl.create_default_context(cafile=ARGS.cafile)


class Imap(imaplib.IMAP4):
    def _create_socket(self, timeout):
        return connect()


class Imaps(imaplib.IMAP4_SSL):
    def _create_socket(self, timeout):
        return self.ssl_context.wrap_socket(connect(), server_hostname=self.host)


class Pop3(poplib.POP3):
    def _create_socket(self, timeout):
        return connect()


class Pop3s(poplib.POP3_SSL):
    def _create_socket(self, timeout):
        return self.context.wrap_socket(connect(), server_hostname=self.host)


def refused(message):
    if ARGS.expect_failure:
        print("LOGIN-REFUSED", message)
        sys.exit(0)
    print("LOGIN-REFUSED", message, file=sys.stderr)
    sys.exit(1)


def imap():
    if ARGS.mode == "imaps":
        client = Imaps(ARGS.host, ARGS.port, ssl_context=context(), timeout=TIMEOUT)
    else:
        client = Imap(ARGS.host, ARGS.port, timeout=TIMEOUT)
        if ARGS.mode == "imap-starttls":
            client.starttls(ssl_context=context())
    try:
        client.login(ARGS.user, ARGS.password)
    except imaplib.IMAP4.error as error:
        refused(error)
    if ARGS.expect_failure:
        print("logged in although a failure was expected", file=sys.stderr)
        sys.exit(1)
    print("LOGGED-IN")
    if ARGS.append:
        message = (
            "From: test@example.com\r\nTo: {0}\r\nSubject: {1}\r\n\r\nSent through mailproxy.\r\n"
        ).format(ARGS.user, ARGS.append)
        typ, _ = client.append("INBOX", None, None, message.encode())
        assert typ == "OK", typ
        typ, _ = client.select("INBOX")
        assert typ == "OK", typ
        typ, data = client.search(None, "SUBJECT", '"{}"'.format(ARGS.append))
        assert typ == "OK" and data[0], (typ, data)
        number = data[0].split()[-1]
        typ, data = client.fetch(number, "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
        assert typ == "OK", typ
        header = data[0][1].decode()
        assert ARGS.append in header, header
        print("FOUND", header.strip())
    client.logout()


def pop3():
    if ARGS.mode == "pop3s":
        client = Pop3s(ARGS.host, ARGS.port, context=context(), timeout=TIMEOUT)
    else:
        client = Pop3(ARGS.host, ARGS.port, timeout=TIMEOUT)
        if ARGS.mode == "pop3-stls":
            client.stls(context=context())
    try:
        client.user(ARGS.user)
        client.pass_(ARGS.password)
    except poplib.error_proto as error:
        refused(error)
    if ARGS.expect_failure:
        print("logged in although a failure was expected", file=sys.stderr)
        sys.exit(1)
    print("LOGGED-IN")
    if ARGS.expect:
        count, _ = client.stat()
        found = None
        for number in range(1, count + 1):
            _, lines, _ = client.retr(number)
            for line in lines:
                if line.decode(errors="replace") == "Subject: " + ARGS.expect:
                    found = line.decode()
        assert found, "no message with subject {} among {}".format(ARGS.expect, count)
        print("FOUND", found)
    client.quit()


if ARGS.mode.startswith("imap"):
    imap()
else:
    pop3()
