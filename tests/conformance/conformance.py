"""Drives idsync's emulators with the vendors' official Python clients, to prove the emulators
behave like the real services: msgraph-sdk with azure-identity (ClientSecretCredential against the
emulated authority, over HTTPS), databricks-sdk's AccountClient, and lakefs-sdk.

Run by scripts/conformance.sh, which starts `idsync-emulator all --tls` and passes its ports file.
Prints one line per check and ends with "N passed, M failed".
"""

import asyncio
import json
import os
import sys
import traceback

import requests

RESULTS = []


def check(name, fn):
    try:
        fn()
        RESULTS.append((name, None))
        print(f"ok    {name}")
    except Exception as e:  # noqa: BLE001 - every failure is reported, none stops the suite
        RESULTS.append((name, e))
        print(f"FAIL  {name}: {e!r}")
        traceback.print_exc()


def graph_checks(p):
    from azure.identity import ClientSecretCredential
    from kiota_abstractions.base_request_configuration import RequestConfiguration
    from msgraph import GraphServiceClient
    from msgraph.generated.groups.delta.delta_request_builder import DeltaRequestBuilder
    from msgraph.generated.users.users_request_builder import UsersRequestBuilder

    admin = p["authority"] + "/_admin"
    ca = p["ca"]

    def client():
        cred = ClientSecretCredential(
            p["tenant"], p["clientId"], p["clientSecret"], authority=p["authority"], disable_instance_discovery=True
        )
        c = GraphServiceClient(credentials=cred, scopes=["https://graph.microsoft.com/.default"])
        c.request_adapter.base_url = p["graph"]
        return c

    def wrong_secret():
        from azure.core.exceptions import ClientAuthenticationError

        cred = ClientSecretCredential(
            p["tenant"], p["clientId"], "not-the-secret", authority=p["authority"], disable_instance_discovery=True
        )
        try:
            cred.get_token("https://graph.microsoft.com/.default")
        except ClientAuthenticationError as e:
            assert "AADSTS7000215" in str(e), str(e)
            return
        raise AssertionError("a wrong secret was accepted")

    def token():
        cred = ClientSecretCredential(
            p["tenant"], p["clientId"], p["clientSecret"], authority=p["authority"], disable_instance_discovery=True
        )
        t = cred.get_token("https://graph.microsoft.com/.default")
        assert t.token and t.expires_on > 0

    async def list_users_paging():
        c = client()
        q = UsersRequestBuilder.UsersRequestBuilderGetQueryParameters(
            select=["id", "userPrincipalName", "accountEnabled", "userType"], top=120
        )
        page = await c.users.get(request_configuration=RequestConfiguration(query_parameters=q))
        users = list(page.value)
        pages = 1
        while page.odata_next_link:
            page = await c.users.with_url(page.odata_next_link).get()
            users += page.value
            pages += 1
        assert len(users) == p["expect_users"], (len(users), p["expect_users"])
        assert pages == -(-p["expect_users"] // 120), pages
        assert len({u.id for u in users}) == len(users), "duplicates across pages"
        assert any(u.user_type == "Guest" for u in users)
        assert any(u.account_enabled is False for u in users)

    async def delta_round():
        c = client()
        q = DeltaRequestBuilder.DeltaRequestBuilderGetQueryParameters(select=["displayName", "members"])
        resp = await c.groups.delta.get(request_configuration=RequestConfiguration(query_parameters=q))
        items = list(resp.value)
        while resp.odata_next_link:
            resp = await c.groups.delta.with_url(resp.odata_next_link).get()
            items += resp.value
        delta_link = resp.odata_delta_link
        assert delta_link, "a round ends with a deltaLink"
        groups = {g.id for g in items}
        assert len(groups) == p["expect_groups"], (len(groups), p["expect_groups"])
        members = {}
        for g in items:
            for m in g.additional_data.get("members@delta", []):
                members.setdefault(g.id, set()).add(str(m["id"]))
        assert sum(len(v) for v in members.values()) > 0
        # An administrator adds a member; the next round reports exactly that.
        gid, uid = p["some_group"], p["some_user"]
        r = requests.post(f"{admin}/groups/{gid}/members", json={"type": "user", "id": uid}, verify=ca, timeout=10)
        assert r.status_code == 204, r.text
        resp = await c.groups.delta.with_url(delta_link).get()
        changed = list(resp.value)
        while resp.odata_next_link:
            resp = await c.groups.delta.with_url(resp.odata_next_link).get()
            changed += resp.value
        assert [g.id for g in changed] == [gid], [g.id for g in changed]
        # kiota parses GUID-shaped ids in additional_data into UUIDs.
        added = [{k: str(v) for k, v in m.items()} for m in changed[0].additional_data.get("members@delta", [])]
        assert added == [{"@odata.type": "#microsoft.graph.user", "id": uid}], added

    fixture = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "entra-test-client.pem")

    def certificate():
        from azure.identity import CertificateCredential

        cred = CertificateCredential(
            p["tenant"], p["clientId"], certificate_path=fixture, authority=p["authority"], disable_instance_discovery=True
        )
        assert cred.get_token("https://graph.microsoft.com/.default").token

    def workload_identity():
        import base64
        import tempfile
        import time
        from azure.identity import WorkloadIdentityCredential

        part = lambda v: base64.urlsafe_b64encode(json.dumps(v).encode()).rstrip(b"=").decode()
        now = int(time.time())
        jwt = ".".join([
            part({"alg": "RS256", "typ": "JWT"}),
            part({"iss": "https://oidc.example", "sub": "system:serviceaccount:idsync:idsync",
                  "aud": "api://AzureADTokenExchange", "iat": now, "exp": now + 3600}),
            "c2ln",
        ])
        with tempfile.NamedTemporaryFile("w", suffix=".jwt", delete=False) as f:
            f.write(jwt)
        cred = WorkloadIdentityCredential(
            tenant_id=p["tenant"], client_id=p["clientId"], token_file_path=f.name,
            authority=p["authority"], disable_instance_discovery=True,
        )
        assert cred.get_token("https://graph.microsoft.com/.default").token

    def managed_identity():
        from azure.identity import ManagedIdentityCredential

        # azure-identity's IMDS override; the emulator's first managed identity is the system one.
        os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"] = p["authority"]
        try:
            cred = ManagedIdentityCredential()
            assert cred.get_token("https://graph.microsoft.com/.default").token
        finally:
            del os.environ["AZURE_POD_IDENTITY_AUTHORITY_HOST"]

    check("graph: azure-identity ClientSecretCredential gets a token from the emulated authority", token)
    check("graph: azure-identity CertificateCredential's signed assertion is verified", certificate)
    check("graph: azure-identity WorkloadIdentityCredential exchanges a federated token", workload_identity)
    check("graph: azure-identity ManagedIdentityCredential gets a token from the emulated IMDS", managed_identity)
    check("graph: a wrong secret fails with AADSTS7000215", wrong_secret)
    check("graph: msgraph-sdk lists users across pages ($select, $top, nextLink)", lambda: asyncio.run(list_users_paging()))
    check("graph: msgraph-sdk runs a groups delta round, then reads one change", lambda: asyncio.run(delta_round()))


def databricks_checks(p):
    from databricks.sdk import AccountClient
    from databricks.sdk.service import iam

    a = AccountClient(host=p["databricks"], account_id=p["account"], token=p["databricksToken"], auth_type="pat")
    schema = [iam.PatchSchema.URN_IETF_PARAMS_SCIM_API_MESSAGES_2_0_PATCH_OP]
    state = {}

    def users():
        u = a.users.create(user_name="conformance.user@contoso.example", display_name="Conformance User")
        assert u.id
        state["user"] = u.id
        found = list(a.users.list(filter='userName eq "conformance.user@contoso.example"'))
        assert [x.id for x in found] == [u.id], found
        a.users.patch(id=u.id, operations=[iam.Patch(op=iam.PatchOp.REPLACE, path="active", value="false")], schemas=schema)
        assert a.users.get(id=u.id).active is False

    def service_principals():
        sp = a.service_principals.create(application_id="3f1c7a2e-0000-4000-8000-00000000c0f1", display_name="conformance-sp")
        assert sp.id
        state["sp"] = sp.id
        assert any(x.id == sp.id for x in a.service_principals.list())

    def groups():
        g = a.groups.create(display_name="conformance-group", members=[iam.ComplexValue(value=state["user"])])
        a.groups.patch(
            id=g.id,
            operations=[iam.Patch(op=iam.PatchOp.ADD, value={"members": [{"value": state["sp"]}]})],
            schemas=schema,
        )
        got = a.groups.get(id=g.id)
        assert sorted(m.value for m in got.members) == sorted([state["user"], state["sp"]]), got.members
        a.groups.patch(
            id=g.id,
            operations=[iam.Patch(op=iam.PatchOp.REMOVE, path=f'members[value eq "{state["user"]}"]')],
            schemas=schema,
        )
        got = a.groups.get(id=g.id)
        assert [m.value for m in got.members] == [state["sp"]], got.members
        listed = [x for x in a.groups.list() if x.id == g.id]
        assert listed and not listed[0].members, "groups are listed without members"

    def paging():
        for i in range(30):
            a.users.create(user_name=f"page{i:02}@contoso.example")
        names = [u.user_name for u in a.users.list(filter='userName sw "page"', count=7)]
        assert len(names) == 30 and len(set(names)) == 30, len(names)

    def delete():
        a.users.delete(id=state["user"])
        assert not any(u.id == state["user"] for u in a.users.list())

    check("databricks: AccountClient creates, filters and deactivates a user", users)
    check("databricks: AccountClient creates and lists a service principal", service_principals)
    check("databricks: AccountClient creates a group and patches its members", groups)
    check("databricks: AccountClient pages through a list (startIndex/count)", paging)
    check("databricks: AccountClient deletes a user", delete)


def lakefs_checks(p):
    import lakefs_sdk

    conf = lakefs_sdk.Configuration(host=p["lakefs"], username=p["lakefsKey"], password=p["lakefsSecret"])
    client = lakefs_sdk.ApiClient(conf)
    auth = lakefs_sdk.AuthApi(client)
    state = {}

    def users_and_groups():
        auth.create_user(lakefs_sdk.UserCreation(id="waad|0b6f1c2e"))
        g = auth.create_group(lakefs_sdk.GroupCreation(id="Conformance Équipe", description="d"))
        assert g.name == "Conformance Équipe" and g.id != g.name
        state["group"] = g.id
        auth.add_group_membership(g.id, "waad|0b6f1c2e")
        members = auth.list_group_members(g.id).results
        assert [m.id for m in members] == ["waad|0b6f1c2e"], members

    def policies():
        for pol in ["AuthManageOwnCredentials", "FSReadAll"]:
            auth.attach_policy_to_group(state["group"], pol)
        got = sorted(x.id for x in auth.list_group_policies(state["group"]).results)
        assert got == ["AuthManageOwnCredentials", "FSReadAll"], got

    def conflict():
        try:
            auth.create_group(lakefs_sdk.GroupCreation(id="Conformance Équipe"))
        except lakefs_sdk.ApiException as e:
            assert e.status == 409, e.status
            return
        raise AssertionError("a duplicate group was created")

    def paging():
        for i in range(25):
            auth.create_user(lakefs_sdk.UserCreation(id=f"page{i:02}"))
        seen, after = [], ""
        while True:
            r = auth.list_users(prefix="page", after=after, amount=10)
            seen += [u.id for u in r.results]
            if not r.pagination.has_more:
                break
            after = r.pagination.next_offset
        assert len(seen) == 25, len(seen)

    def wrong_key():
        bad = lakefs_sdk.AuthApi(lakefs_sdk.ApiClient(lakefs_sdk.Configuration(host=p["lakefs"], username=p["lakefsKey"], password="wrong")))
        try:
            bad.list_users()
        except lakefs_sdk.ApiException as e:
            assert e.status == 401, e.status
            return
        raise AssertionError("a wrong key was accepted")

    check("lakefs: lakefs-sdk creates a user and a group and adds the membership", users_and_groups)
    check("lakefs: lakefs-sdk attaches and lists group policies", policies)
    check("lakefs: a duplicate group is a 409", conflict)
    check("lakefs: lakefs-sdk pages with prefix/after/amount", paging)
    check("lakefs: a wrong key pair is a 401", wrong_key)


def main():
    p = json.load(open(sys.argv[1]))
    p["ca"] = sys.argv[2]
    p.update(json.load(open(sys.argv[3])))
    graph_checks(p)
    databricks_checks(p)
    lakefs_checks(p)
    failed = sum(1 for _, e in RESULTS if e is not None)
    print(f"conformance: {len(RESULTS) - failed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
