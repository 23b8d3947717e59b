# Files mail that mailgate's auth filter quarantined into the recipient's Junk folder.
# mailgate adds "X-Mailgate-Quarantine: dmarc" when a message fails DMARC and the From domain's
# policy asks for quarantine (or reject, with [auth] dmarc_action = "quarantine"). Runs before the
# user's own scripts (sieve_before in 90-mailgate-quarantine.conf); "stop" keeps those from
# filing it elsewhere as well. A sender who adds the header himself only sends himself to Junk.
require ["fileinto", "mailbox"];

if header :is "X-Mailgate-Quarantine" "dmarc" {
    fileinto :create "Junk";
    stop;
}
